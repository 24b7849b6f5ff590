"""`coalign caption RUN IMAGES...`: captions for image files from a run with a caption decoder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coalign.registry import ConfigError


def add_caption(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with a run's caption decoder (coca)",
        description="Generate a caption for each image with the caption decoder of RUN (a recipe with "
        "model.decoder, such as coca): greedy by default, beam search with --beam, top-p sampling with "
        "--top-p. Prints one line per image: the path, a tab, the caption (--json: JSON lines with "
        "the log-probability score). Undecodable images are skipped and counted.",
    )
    p.add_argument("run", type=Path, help="run folder or checkpoint folder")
    p.add_argument("images", type=Path, nargs="+", help="image files")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--beam", type=int, metavar="N", help="beam search keeping N captions per image")
    how.add_argument("--top-p", type=float, metavar="P", help="sample from the nucleus of probability P")
    p.add_argument("--temperature", type=float, default=1.0, help="of top-p sampling (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="of top-p sampling (default: 0)")
    p.add_argument(
        "--max-length",
        type=int,
        metavar="L",
        help="tokens per caption, start and stop included "
        "(default and most: the text tower's context length)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="JSON lines: image, caption, score, stopped")
    p.set_defaults(func=cmd_caption)


def cmd_caption(args: argparse.Namespace) -> int:
    from coalign.models.generate import Decoding

    # every argument checked before the model loads
    decoding = Decoding(
        beam=1 if args.beam is None else args.beam,
        top_p=args.top_p,
        temperature=args.temperature,
        max_length=args.max_length,
        seed=args.seed,
    )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    for path in args.images:
        if path.is_dir():
            raise IsADirectoryError(f"image '{path}' is a folder; name image files")
        if not path.is_file():
            raise FileNotFoundError(f"image '{path}' not found")
    if not args.run.exists():
        raise FileNotFoundError(f"run '{args.run}' not found")
    skipped = 0
    for path, caption in caption_files(args.run, args.images, decoding, args.batch_size, args.device):
        if caption is None:
            skipped += 1
            print(f"coalign caption: skipped '{path}': not a decodable image", file=sys.stderr)
        elif args.json:
            print(json.dumps({"image": str(path), **caption}, ensure_ascii=False))
        else:
            # one line per image, whatever the caption holds (an untrained model may emit a newline)
            print(f"{path}\t{' '.join(caption['caption'].split())}")
    if skipped:
        print(
            f"coalign caption: {skipped} of {len(args.images)} images skipped (undecodable)", file=sys.stderr
        )
    return 0 if skipped < len(args.images) else 1


def caption_files(run_path: Path, paths: list[Path], decoding, batch_size: int, device: str | None):
    """Yield (path, {caption, score, stopped}) per image file, in order; None for an undecodable one."""
    import numpy as np
    import torch

    from coalign.build import load_run
    from coalign.data.sources.base import SampleError
    from coalign.models.generate import Captioner
    from coalign.runtime import Runtime

    run = load_run(run_path, Runtime.create("fp32", device))
    if run.model.decoder is None:
        raise ConfigError(
            f"run '{run_path}' has no caption decoder (model.decoder); train one with a recipe such as coca"
        )
    decoder = run.model.decoder
    captioner = Captioner.of(run.model, run.transforms[decoder.text])
    captioner.length(decoding)  # a --max-length beyond the tower's positions fails before any work
    image_transform, rng = run.transforms[decoder.context], np.random.default_rng(0)
    device = next(run.model.parameters()).device
    for start in range(0, len(paths), batch_size):
        chunk, images, ok = paths[start : start + batch_size], [], []
        for i, path in enumerate(chunk):
            try:
                images.append(image_transform(path, rng))
                ok.append(i)
            except (SampleError, OSError, ValueError):
                pass
        results: dict[int, dict] = {}
        if images:
            out = captioner.generate(torch.stack(images).to(device), decoding)
            texts = captioner.texts(run.transforms[decoder.text], out)
            for j, i in enumerate(ok):
                results[i] = {
                    "caption": texts[j],
                    "score": float(out.scores[j]),
                    "stopped": bool(out.stopped[j]),
                }
        for i, path in enumerate(chunk):
            yield path, results.get(i)
