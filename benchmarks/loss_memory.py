"""Peak memory and time of contrastive losses at large batch (forward + backward), as JSON: SigLIP
plain vs chunked, and InfoNCE plain vs tiled (`--loss infonce`).

    python benchmarks/loss_memory.py [--loss siglip|infonce] [--batch-sizes 1024 4096 16384] [--dim 512]
                                     [--chunk 1024] [--repeats 3] [--device auto|cpu|cuda]
                                     [--mmap-threshold 1048576]

Each (batch size, variant) runs in a fresh subprocess of this script (`--one`), so that neither the
allocator's cache nor the high-water mark of one configuration can hide another's peak. The driver
itself does not import torch, so children start from a small process.

How a child measures, after building the inputs a, b: (B, dim) and running the same loss once on a
small batch (so one-off costs such as thread pools, kernel workspaces and lazy imports are already
paid and sit in the baseline):
- CUDA: `torch.cuda.max_memory_allocated()` (peak stats reset just before) minus
  `torch.cuda.memory_allocated()` before the runs: the memory the loss's forward and backward allocate,
  the gradients of a and b included, the inputs not.
- CPU: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's peak resident set size) after the runs,
  minus the resident set size read from /proc/self/statm right before them. On Linux the kernel's
  high-water mark is first reset (writing "5" to /proc/self/clear_refs), so that a higher peak from
  start-up (importing torch) cannot mask the loss's peak; `hwm_reset` in the output says whether that
  worked. This is memory the OS really handed the process, so it includes allocator overheads and is
  rounded to pages.
  glibc's malloc keeps freed blocks below its (dynamically raised, up to 32 MiB) mmap threshold in
  its heap, where fragmentation can make the peak reflect the allocator rather than the loss (at
  B = 4096, chunk 1024, the chunked loss's 16 MiB blocks peaked at 241 MB that way, against 58 MB
  with the threshold fixed, and the plain loss at 147 / 142 MB). So children run with MALLOC_MMAP_THRESHOLD_
  fixed at `--mmap-threshold` bytes (default 1 MiB; 0 leaves glibc's default): every large tensor is
  its own mapping, returned to the OS when freed, and RSS tracks the tensors alive at each moment.
  The cost is a page fault per fresh page, a few per cent of `time_ms`.
`time_ms` is the median wall time of `--repeats` forward + backward runs (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from machine import describe  # benchmarks/machine.py
from memory import peak_mb, reset_hwm, rss_mb  # benchmarks/memory.py

VARIANTS = {"siglip": ("plain", "chunked"), "infonce": ("plain", "tiled")}


def run_one(
    batch_size: int,
    dim: int,
    variant: str,
    chunk: int,
    repeats: int,
    device_name: str,
    loss_name: str = "siglip",
) -> dict:
    """Measure one configuration in this (fresh) process; see the module docstring for the method."""
    import gc

    import torch
    import torch.nn.functional as F

    from coalign.objectives.contrastive import info_nce
    from coalign.objectives.siglip import chunked_siglip_loss, siglip_loss
    from coalign.objectives.tiled import tiled_info_nce

    losses = {
        ("siglip", "plain"): lambda a, b, t, bias, c: siglip_loss(a, b, t, bias),
        ("siglip", "chunked"): lambda a, b, t, bias, c: chunked_siglip_loss(a, b, t, bias, chunk=c),
        ("infonce", "plain"): lambda a, b, t, bias, c: info_nce(a, b, t),
        ("infonce", "tiled"): lambda a, b, t, bias, c: tiled_info_nce(a, b, t, tile=c),
    }
    loss_fn = losses[(loss_name, variant)]

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)

    def inputs(B: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        a = F.normalize(torch.randn(B, dim, generator=g), dim=-1)
        b = F.normalize(a + torch.randn(B, dim, generator=g), dim=-1)
        leaves = [a, b, torch.tensor(10.0), torch.tensor(-10.0)]
        return [t.to(device).requires_grad_() for t in leaves]

    def step(leaves: list[torch.Tensor], c: int) -> float:
        start = time.perf_counter()
        loss = loss_fn(*leaves, c)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        del loss, grads
        return time.perf_counter() - start

    step(inputs(64), 16)  # warm-up: pays one-off costs outside the measurement
    leaves = inputs(batch_size)
    gc.collect()
    hwm_reset = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        hwm_reset = reset_hwm()
        base = rss_mb()
    times = [step(leaves, chunk) for _ in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = peak_mb() - base if base is not None else float("nan")
    out = {
        "batch_size": batch_size,
        "variant": variant,
        "chunk": chunk if variant != "plain" else None,
        "peak_mb": round(peak, 1),
        "time_ms": round(1000 * statistics.median(times), 1),
        # One (B, B) or (B, chunk) float32 block of logits, for scale.
        "logits_block_mb": round(batch_size * (batch_size if variant == "plain" else chunk) * 4 / 2**20, 1),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if hwm_reset is not None:
        out["hwm_reset"] = hwm_reset
    return out


def spawn(args: argparse.Namespace, batch_size: int, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(batch_size), variant, "--loss", args.loss]
    cmd += ["--dim", str(args.dim), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    cmd += ["--device", args.device]
    env = dict(os.environ)
    if args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # glibc reads it at start-up
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # e.g. killed for memory: report it and carry on with the others
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"batch_size": batch_size, "variant": variant, "error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="siglip", choices=sorted(VARIANTS))
    parser.add_argument(
        "--variants", nargs="+", help="only these variants (the plain loss at B = 65,536 needs ~34 GB)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--mmap-threshold", type=int, default=2**20, help="glibc MALLOC_MMAP_THRESHOLD_; 0: default"
    )
    parser.add_argument("--one", nargs=2, metavar=("BATCH_SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child: measure one configuration and print one JSON line
        batch_size, variant = int(args.one[0]), args.one[1]
        print(
            json.dumps(
                run_one(batch_size, args.dim, variant, args.chunk, args.repeats, args.device, args.loss)
            )
        )
        return
    variants = args.variants or VARIANTS[args.loss]
    results = [spawn(args, B, v) for B in args.batch_sizes for v in variants]
    common = {k: v for k, v in results[0].items() if k in ("device", "threads", "torch")}
    for r in results:
        for k in ("device", "threads", "torch"):
            r.pop(k, None)
    report = {
        "benchmark": "loss_memory",
        "loss": args.loss,
        **common,
        "dim": args.dim,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "malloc_mmap_threshold": args.mmap_threshold or "glibc default",
        "machine": describe(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
