"""Multimodal masked autoencoding of images and text together (M3AE, Geng et al. 2022,
arXiv:2205.14204): one encoder over the visible image patches and the visible caption tokens, one
light decoder that reconstructs both.

Here the one encoder is the towers followed by the model's single-stream fusion part (UNITER's
`single`: both token sequences, each with a type embedding, concatenated through one transformer),
the shape coalign already has for a joint encoder. Masking, per pair:

- image: a random `image_mask_ratio` of the patches hidden, through the image tower's one masking
  path (models/masking.py, the keep indices of FLIP and MAE): the tower encodes the visible ones;
- text: round(`text_mask_ratio` * words) of each caption's word tokens hidden (never `<pad>`,
  `<bos>`, `<eos>`: the tokenizer's `special_ids`, as MLM). Rows hide different numbers of tokens,
  so the text tower and the fusion part take them out through the padding mask (`hidden`): no token
  attends to them, which is what removing them gives, and the batch stays rectangular.

The decoder (in the objective; its own width and depth) gets the fused tokens back in place among a
learnt mask token at every hidden patch and hidden word, adds positions (2-D sin-cos over the patch
grid; learnt positions along the caption) and a type embedding per modality, runs a small
transformer over both (padding masked), and predicts each hidden patch's pixels and each hidden
word's id. The loss is MAE's on the hidden patches (per-patch normalised pixels, `norm_pix`) plus
`text_weight` times the mean cross-entropy over the hidden words; both are logged as metrics.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.sample import present_rows
from coalign.models.encoders.text import TextTransformer
from coalign.models.layers import padding_attn_mask
from coalign.models.masking import random_keep
from coalign.models.model import Features
from coalign.objectives.base import FusedObjective, FusedOptions
from coalign.objectives.distributed import Rows, own_rows
from coalign.objectives.mae import DecoderSize, MaskedDecoder, masked_tower, patch_loss, probe_patches
from coalign.registry import OBJECTIVES, ConfigError


class M3AEConfig(FusedOptions, DecoderSize):
    fusion_kind: ClassVar[str] = "single"  # the fusion part it needs (both streams come out)

    text: str = "text"  # which of `modalities` holds the caption ids; the other is the image
    image_mask_ratio: float = pydantic.Field(0.75, gt=0.0, lt=1.0)
    text_mask_ratio: float = pydantic.Field(0.5, gt=0.0, lt=1.0)
    norm_pix: bool = True
    text_weight: float = pydantic.Field(1.0, ge=0.0)  # the text cross-entropy's share of the loss

    @pydantic.model_validator(mode="after")
    def _text_is_one_of_them(self):
        if self.text not in self.modalities:
            raise ValueError(f"text '{self.text}' must be one of modalities {list(self.modalities)}")
        return self


def hide_words(
    eligible: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, L) bool: round(ratio * n) of each row's n `eligible` positions, drawn uniformly."""
    noise = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    noise = noise.masked_fill(~eligible, 2.0)  # the ineligible sort last
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L) each position's place in its row's draw
    count = (eligible.sum(1, keepdim=True) * ratio).round()  # (B, 1)
    return (rank < count) & eligible


def text_loss(
    logits: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the hidden words: logits (n, V) of the hidden positions in
    row-major order, ids (B, L), hidden (B, L) bool; 0 (still in the graph) when none is hidden.
    `scale` (default 1 / n) multiplies the sums (`Rows.per_item` under several ranks)."""
    target = ids[hidden]  # (n,)
    scale = 1.0 / max(target.shape[0], 1) if scale is None else scale
    loss = F.cross_entropy(logits.float(), target, reduction="sum") * scale
    return loss, ((logits.argmax(-1) == target).float().sum() * scale).detach()


@OBJECTIVES.register("m3ae")
class M3AE(FusedObjective):
    Config = M3AEConfig
    name = "m3ae"
    needs_inputs = True  # masks the batch's images and captions and encodes them again

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        super().bind(model, transforms)  # a fusion part over exactly these two modalities
        if not model.fusion.both_streams:
            raise ConfigError(
                f"m3ae: needs a fusion part whose output holds both streams (model.fusion.fusion: "
                f"{self.cfg.fusion_kind}); the model's is a '{type(model.fusion).__name__}'"
            )
        c = self.cfg
        image = next(m for m in c.modalities if m != c.text)
        self.image = image
        vit = masked_tower(self.name, model, image)
        if probe_patches(vit).grid is None:
            raise ConfigError(f"m3ae: the '{image}' tower must cut its input into a grid of patches")
        text = dict(model.towers).get(c.text)
        if not isinstance(text, TextTransformer):
            raise ConfigError(f"m3ae: '{c.text}' needs a 'text_transformer' tower (it hides words by mask)")
        transform = (transforms or {}).get(c.text)
        described = transform.describe() if transform is not None else {}
        vocab = described.get("vocab_size") or text.cfg.vocab_size
        specials = transform.special_ids() if hasattr(transform, "special_ids") else [text.cfg.pad_id]
        words = torch.ones(vocab, dtype=torch.bool)
        words[[s for s in specials if s < vocab]] = False
        self.register_buffer("words", words, persistent=False)  # from the tokenizer, saved by the run

        W, p = c.decoder_width, vit.cfg.patch_size
        # image side: MAE's decoder (projection, mask token, 2-D sin-cos, transformer, pixel head)
        self.decoder = MaskedDecoder(
            model.fusion.width,
            W,
            c.decoder_depth,
            c.decoder_heads,
            p * p * 3,
            int(vit.num_prefix_tokens),
            False,
        )
        self.text_pos = nn.Parameter(torch.randn(1, text.cfg.context_length, W) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(2, W) * 0.02)  # (text, image) rows of the decoder
        self.text_head = nn.Linear(W, vocab)
        nn.init.trunc_normal_(self.text_head.weight, std=0.02)
        nn.init.zeros_(self.text_head.bias)

    def encode(self, ids: torch.Tensor, images: torch.Tensor, own: Rows | None = None):
        """The joint encoding of the masked pairs: fused text rows (m, L, Df), fused image rows
        (m, 1 + K, Df), the image patches (with their pixel targets), keep (m, K), hidden (m, L), of
        the `own` rows of the M pairs (all of them by default; `Rows.pick`). The masks are drawn for
        all M, so each rank hides what a single process would."""
        c, model = self.cfg, self.model
        own = own or Rows.every(ids.shape[0])
        vit, text = model.towers[self.image], model.towers[c.text]
        patches = vit.patches(own.pick(images), targets=True)
        keep = own.pick(random_keep(ids.shape[0], patches.count, c.image_mask_ratio, images.device))
        image_tokens = vit.encode_patches(patches.tokens, keep)  # (m, 1 + K, D)
        words = self.words.to(ids.device)[ids.clamp(0, self.words.shape[0] - 1)]  # (M, L)
        hidden = own.pick(hide_words(text.real_tokens(ids) & words, c.text_mask_ratio))
        ids = own.pick(ids)
        text_tokens = text(ids, hidden=hidden)  # hidden words are out of its mask
        fused = model.fuse({c.text: text_tokens, self.image: image_tokens}).tokens  # (M, Nq + Nc, Df)
        L, n = ids.shape[1], fused.shape[1]
        text_first = model.fusion.query == c.text  # the query's rows come first
        t_rows = fused[:, :L] if text_first else fused[:, n - L :]
        i_rows = fused[:, L:] if text_first else fused[:, : n - L]
        return t_rows, i_rows, patches, keep, hidden

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        c, model, image = self.cfg, self.model, self.image
        rows_t, rows_i = present_rows(batch, (c.text, image))
        ids, images = batch[c.text], batch[image]
        if ids.ndim != 2:
            raise ValueError(
                f"m3ae masks single captions (M, L); '{c.text}' holds {tuple(ids.shape)} (captions: 1)"
            )
        ids = ids if rows_t is None else ids[rows_t.to(ids.device)]  # (M, L)
        images = images if rows_i is None else images[rows_i.to(images.device)]  # (M, 3, H, W)
        if ids.shape[0] == 0:
            zero = self.text_head.weight.sum() * 0.0  # keeps the graph (and DDP) whole
            return {"m3ae_loss": zero}
        own = own_rows(batch, (c.text, image), ids.shape[0])  # each rank its own pairs (local loss)
        t_rows, i_rows, patches, keep, hidden = self.encode(ids, images, own)
        ids = own.pick(ids)
        L, real = ids.shape[1], model.towers[c.text].real_tokens(ids)

        dec = self.decoder
        x_text = dec.embed(t_rows)  # (M, L, W)
        x_text = torch.where(hidden[..., None], dec.mask_token.to(x_text.dtype), x_text)
        x_text = x_text + self.text_pos[:, :L].to(x_text.dtype) + self.type_embed[0].to(x_text.dtype)
        x_image = dec.fill(i_rows, keep, patches) + self.type_embed[1].to(x_text.dtype)  # (M, 1 + P, W)
        valid = torch.cat([real, real.new_ones(x_image.shape[:2])], dim=1)  # padding never attended
        out = dec.decoder(torch.cat([x_text, x_image], dim=1), padding_attn_mask(valid))
        pixels = dec.head(out[:, L + dec.prefix :])  # (M, P, p * p * 3)
        logits = self.text_head(out[:, :L][hidden]).float().masked_fill(~self.words, float("-inf"))

        image_loss = own.share(patch_loss(pixels, patches.target, keep, c.norm_pix))  # K hidden per row
        words_loss, accuracy = text_loss(logits, ids, hidden, own.per_item(hidden.sum()))
        return {
            "m3ae_loss": image_loss + c.text_weight * words_loss,
            "image_mse": image_loss.detach(),
            "text_ce": words_loss.detach(),
            "text_accuracy": accuracy,
            "text_hidden": own.share(hidden.sum().float().detach() / real.sum().clamp_min(1)),
        }
