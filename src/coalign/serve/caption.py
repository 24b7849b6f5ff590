"""`POST /caption`: captions for images, from the served run's caption decoder (a coca run).

Registered by `create_app` with one call, and only when the run has a decoder (its recipe names
`model.decoder`; reading the recipe is cheap, so the app still loads its model at the first query).
The request names one image or a batch of them (base64, as `/embed` takes them) and how to decode:
greedy by default, `beam` for beam search, `top_p` for nucleus sampling, `max_length` in tokens.
The schema carries the bounds; a body that breaks it answers 422, an undecodable image 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from coalign.data.sources.base import SampleError
from coalign.serve.schemas import INVALID, JsonInt, Text, _described, _exactly_one

if TYPE_CHECKING:
    from fastapi import FastAPI

MAX_BEAM = 16  # wider beams cost beam x the compute of greedy decoding, for little gain


class Captioned(BaseModel):
    caption: str
    score: float  # the sum of the log-probabilities of the caption's tokens
    stopped: bool  # ended with the stop token (False: cut at max_length)


class Captions(BaseModel):
    captions: list[Captioned]
    took_ms: float


def has_decoder(index: Any) -> bool:
    """Whether the index's run (its checkpoint's recipe) has a caption decoder."""
    from coalign.build import RECIPE_FILE, run_dir_of
    from coalign.checkpoint import resolve_checkpoint
    from coalign.config import load_recipe

    checkpoint = getattr(index, "checkpoint", None)
    if checkpoint is None:
        return False
    try:
        recipe = load_recipe(run_dir_of(resolve_checkpoint(Path(checkpoint))) / RECIPE_FILE)
    except (OSError, ValueError):  # the index's own loading reports a missing or bad run
        return False
    return recipe.model.decoder is not None


def caption_request(max_batch: int):
    Image64 = _described(Text, format="base64-image")
    Beam = Annotated[JsonInt, Field(ge=1, le=MAX_BEAM)]
    TopP = Annotated[float, Field(gt=0.0, le=1.0)]

    class CaptionRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", strict=True, json_schema_extra=_exactly_one(("image", "images"))
        )
        image: Image64 | None = None
        images: _described(list[Image64], minItems=1, maxItems=max_batch) | None = None
        beam: Beam | None = None  # beam search of this width (1: greedy); not with top_p
        top_p: TopP | None = None  # nucleus sampling; not with beam
        temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
        seed: Annotated[JsonInt, Field(ge=0, le=2**31 - 1)] = 0
        max_length: Annotated[JsonInt, Field(ge=2, le=1024)] | None = None  # tokens, start and stop included

    return CaptionRequest


def add_caption_route(app: FastAPI, index: Any, limits: Any, model_lock: Any) -> None:
    """Add `POST /caption` to `app` when the index's run has a caption decoder."""
    if not has_decoder(index):
        return
    import time

    from coalign.models.generate import Captioner, Decoding
    from coalign.registry import ConfigError
    from coalign.serve import schemas
    from coalign.serve.bodies import ApiError, check_image, decode_base64, only_one, takes

    CaptionRequest = caption_request(limits.max_batch)
    state: dict[str, Any] = {}

    def captioner() -> tuple[Captioner, Any, Any]:
        if "captioner" not in state:
            run = index.loaded_run()  # the model the index encodes queries with, loaded once
            decoder = run.model.decoder
            text = run.transforms[decoder.text]
            state["captioner"] = (Captioner.of(run.model, text), text, run.transforms[decoder.context])
        return state["captioner"]

    responses = {**schemas.BAD_CONTENT, **INVALID}

    @app.post("/caption", response_model=Captions, responses=responses)
    @takes(req=CaptionRequest)
    def caption(req):
        started = time.perf_counter()
        field = only_one(req, ("image", "images"))
        if req.beam is not None and req.top_p is not None:
            raise ApiError(422, "give beam or top_p, not both", {"given": ["beam", "top_p"]})
        data = [decode_base64(req.image)] if field == "image" else [decode_base64(i) for i in req.images]
        for blob in data:
            check_image(blob, limits)
        with model_lock:
            cap, text, image_transform = captioner()
            try:
                decoding = Decoding(
                    beam=req.beam or 1,
                    top_p=req.top_p,
                    temperature=req.temperature,
                    max_length=req.max_length,
                    seed=req.seed,
                )
                cap.length(decoding)
            except ConfigError as err:  # max_length beyond the text tower's positions
                raise ApiError(422, "max_length too long", str(err)) from None
            rng = np.random.default_rng(0)
            try:
                images = torch.stack([image_transform(blob, rng) for blob in data])
            except SampleError as err:
                raise ApiError(400, "undecodable image", str(err)) from None
            device = next(cap.model.parameters()).device
            out = cap.generate(images.to(device), decoding)
            texts = cap.texts(text, out)
        captions = [
            {"caption": t, "score": float(s), "stopped": bool(d)}
            for t, s, d in zip(texts, out.scores.tolist(), out.stopped.tolist(), strict=True)
        ]
        return {"captions": captions, "took_ms": (time.perf_counter() - started) * 1000}
