"""Peak memory and time of chunked retrieval and zero-shot evaluation at scale, as JSON.

    python benchmarks/large_eval.py [--images 100000] [--captions 500000] [--dim 512] [--classes 1000]
                                    [--chunk 4096] [--device auto|cpu|cuda]

Embeddings are synthetic (each caption is its image's unit vector plus noise, each image its class
centre plus noise); the figures of interest are time and memory, and the metrics are printed only to
show that the run computed something (they are not a quality measure). The dense caption x image
score matrix would take `dense_matrix_gb`; the chunked evaluation never holds more than a few
(chunk, chunk) blocks. Memory (CPU): the kernel's peak resident
set size during each evaluation minus the resident size right before it (high-water mark reset through
/proc/self/clear_refs; `hwm_reset` says whether that worked), with glibc's mmap threshold fixed at
1 MiB so freed blocks go back to the OS and the peak tracks live tensors (see loss_memory.py).
On CUDA: torch.cuda.max_memory_allocated over the same interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and __name__ == "__main__":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # must be set before the process starts
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py)
from memory import peak_mb, reset_hwm, rss_mb  # noqa: E402  (benchmarks/memory.py)

from coalign.evaluate.classification import chunked_classification_metrics  # noqa: E402
from coalign.evaluate.retrieval import chunked_retrieval_metrics  # noqa: E402


def measure(fn, device: torch.device) -> tuple[dict, float, float]:
    """(result, seconds, peak extra MB) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
        reset_hwm()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = peak_mb() - base
    return out, time.perf_counter() - t0, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--captions", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    g = torch.Generator(device=device).manual_seed(0)
    n_img, n_cap, d = args.images, args.captions, args.dim
    centres = F.normalize(torch.randn(args.classes, d, generator=g, device=device), dim=-1)
    labels = torch.randint(0, args.classes, (n_img,), generator=g, device=device)
    images = torch.empty(n_img, d, device=device)
    for i in range(0, n_img, 65536):  # build in pieces, so generation never doubles the footprint
        rows = slice(i, i + 65536)
        images[rows] = F.normalize(
            centres[labels[rows]] + 1.2 * torch.randn(images[rows].shape, generator=g, device=device), dim=-1
        )
    owner = torch.arange(n_cap, device=device) % n_img  # every image gets n_cap / n_img captions
    captions = torch.empty(n_cap, d, device=device)
    for i in range(0, n_cap, 65536):
        rows = slice(i, i + 65536)
        noise = torch.randn(captions[rows].shape, generator=g, device=device)
        captions[rows] = F.normalize(images[owner[rows]] + 0.05 * noise, dim=-1)

    retrieval, t_ret, mem_ret = measure(
        lambda: chunked_retrieval_metrics(captions, images, owner, chunk=args.chunk), device
    )
    zero_shot, t_zs, mem_zs = measure(
        lambda: chunked_classification_metrics(images, centres, labels, chunk=args.chunk), device
    )
    gb = 2**30
    print(
        json.dumps(
            {
                "benchmark": "large_eval",
                "device": str(device),
                "machine": describe(),
                "threads": torch.get_num_threads(),
                "images": n_img,
                "captions": n_cap,
                "dim": d,
                "classes": args.classes,
                "chunk": args.chunk,
                "embeddings_gb": round((n_img + n_cap) * d * 4 / gb, 3),
                "dense_matrix_gb": round(n_img * n_cap * 4 / gb, 1),
                "retrieval_seconds": round(t_ret, 1),
                "retrieval_peak_extra_mb": round(mem_ret, 1),
                "zero_shot_seconds": round(t_zs, 2),
                "zero_shot_peak_extra_mb": round(mem_zs, 1),
                "hwm_reset": device.type == "cuda" or reset_hwm(),
                "retrieval": {k: round(v, 4) for k, v in retrieval.items()},
                "zero_shot": {k: round(v, 4) for k, v in zero_shot.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
