"""Converters between coalign runs and the checkpoints users already have: OpenCLIP in
(`openclip.py`), Hugging Face CLIP in and out (`hf.py`), ONNX out (`onnx.py`); `run.py` writes a
converted model as a run folder. CLIP's tokenizer and preprocessing are registered transforms
(`data/transforms/clip_bpe.py`, `image_crop.py`), so a converted run loads like any other."""
