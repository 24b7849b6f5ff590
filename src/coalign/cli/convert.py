"""`coalign import openclip | hf` and `coalign export hf | onnx`: the checkpoints users already have,
in and out (the converters live in `coalign.convert`)."""

from __future__ import annotations

from pathlib import Path


def add_import(sub) -> None:
    p = sub.add_parser(
        "import",
        help="turn an OpenCLIP or Hugging Face CLIP checkpoint into a coalign run",
        description="Convert local model files into a run folder that eval, embed, serve and fine-tuning "
        "accept like any run. Nothing is downloaded.",
    )
    kinds = p.add_subparsers(dest="format", required=True)
    oc = kinds.add_parser("openclip", help="an OpenCLIP model config JSON + state dict (.pt / .safetensors)")
    oc.add_argument("--config", type=Path, required=True, help="model config JSON (or open_clip_config.json)")
    oc.add_argument("--checkpoint", type=Path, required=True, help="state dict: .pt, .bin or .safetensors")
    oc.add_argument(
        "--vocab",
        type=Path,
        help="CLIP's BPE file (default: the bpe_simple_vocab_16e6.txt.gz open_clip ships)",
    )
    oc.add_argument("--name", help="the run's name (default: OUT's folder name)")
    oc.add_argument("out", type=Path, help="new run folder")
    oc.set_defaults(func=cmd_import_openclip)
    hf = kinds.add_parser("hf", help="a local transformers CLIPModel or SiglipModel folder")
    hf.add_argument("folder", type=Path, help="folder with config.json, weights and tokenizer files")
    hf.add_argument("--name", help="the run's name (default: OUT's folder name)")
    hf.add_argument("out", type=Path, help="new run folder")
    hf.set_defaults(func=cmd_import_hf)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a Hugging Face CLIPModel folder or as ONNX models",
        description="Export a run (its newest checkpoint) for other tools.",
    )
    kinds = p.add_subparsers(dest="format", required=True)
    hf = kinds.add_parser(
        "hf", help="a folder transformers.CLIPModel or SiglipModel.from_pretrained loads (tokenizer too)"
    )
    hf.add_argument("run", type=Path, help="run folder or checkpoint folder")
    hf.add_argument("out", type=Path, help="new folder")
    hf.set_defaults(func=cmd_export_hf)
    onnx = kinds.add_parser("onnx", help="one ONNX model per tower (dynamic batch), checked with onnxruntime")
    onnx.add_argument("run", type=Path, help="run folder or checkpoint folder")
    onnx.add_argument("out", type=Path, help="new folder")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    onnx.set_defaults(func=cmd_export_onnx)


def _needs(err: ImportError) -> ValueError:
    """A missing optional dependency as the one-line error the command line prints."""
    return ValueError(str(err))


def _said(run_dir: Path, what: str) -> int:
    print(f"{what}: {run_dir}")
    return 0


def cmd_import_openclip(args) -> int:
    from coalign.convert.openclip import import_openclip

    try:
        run = import_openclip(args.config, args.checkpoint, args.out, args.vocab, args.name)
    except ImportError as err:
        raise _needs(err) from None
    return _said(run.run_dir, "imported OpenCLIP model into run")


def cmd_import_hf(args) -> int:
    from coalign.convert.hf import import_hf

    try:
        run = import_hf(args.folder, args.out, args.name)
    except ImportError as err:
        raise _needs(err) from None
    return _said(run.run_dir, "imported Hugging Face model into run")


def cmd_export_hf(args) -> int:
    from coalign.convert.hf import export_hf

    try:
        out = export_hf(args.run, args.out)
    except ImportError as err:
        raise _needs(err) from None
    return _said(out, "wrote Hugging Face model folder")


def cmd_export_onnx(args) -> int:
    from coalign.convert.onnx import export_onnx

    try:
        report = export_onnx(args.run, args.out, opset=args.opset)
    except ImportError as err:
        raise _needs(err) from None
    for tower, r in report["towers"].items():
        print(
            f"{tower}: {r['file']}  max |onnx - torch| {r['max_abs_diff']:.2e} at batch sizes {r['batches']}"
        )
    return _said(Path(args.out), "wrote ONNX models")
