"""Audio Spectrogram Transformer (AST, Gong et al. 2021): waveform -> log-mel -> patches -> Transformer.

The log-mel spectrogram is computed here, in torch, rather than in the transform: the transform
stays a cheap crop/pad of the waveform, the features run on the accelerator with the rest of the
model, and a served checkpoint needs nothing but a waveform. The mel scale is HTK's
(mel = 2595 log10(1 + f / 700), torchaudio's default) with unnormalised triangles evaluated at the
exact FFT bin frequencies, so the filterbank is a closed formula that tests check directly.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
from torch import nn

from coalign.models.encoders.base import Dropout, Encoder, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.layers import PatchConv, Transformer, init_weights, sincos_grid
from coalign.models.masking import Patches, keep_patches, patchify
from coalign.registry import ENCODERS

LOG_EPS = 1e-6  # floor of the mel power before the log: silence maps to log(1e-6), not -inf


class AudioConfig(EncoderConfig):
    inputs_at_least = ("num_samples",)  # room for longer clips than the transform cuts

    sample_rate: Positive | None = None  # taken from the audio transform when unset
    num_samples: Positive | None = None  # likewise: the longest waveform, (B, T) with T <= num_samples
    n_fft: Positive = 400  # 25 ms windows at 16 kHz (AST / Kaldi fbank)
    hop_length: Positive = 160  # 10 ms hop at 16 kHz
    n_mels: Positive = 128
    f_min: float = 0.0
    f_max: float | None = None  # Nyquist when unset
    patch: tuple[Positive, Positive] = (16, 16)  # (mel bins, frames) per patch, non-overlapping
    width: Positive = 768
    depth: Positive = 12
    heads: Positive = 12
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0
    pool: Literal["cls", "mean"] = "cls"  # cls adds a CLS token; mean averages the patch tokens

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}

    @pydantic.model_validator(mode="after")
    def _fits(self) -> AudioConfig:
        if self.n_mels % self.patch[0]:
            raise ValueError(
                f"n_mels {self.n_mels} must be divisible by the patch's mel size {self.patch[0]}"
            )
        if self.num_samples is not None and self.num_samples <= self.n_fft // 2:
            raise ValueError(f"num_samples {self.num_samples} must exceed n_fft // 2 = {self.n_fft // 2}")
        if self.sample_rate is not None:
            f_max = self.f_max if self.f_max is not None else self.sample_rate / 2
            if not 0.0 <= self.f_min < f_max <= self.sample_rate / 2:
                raise ValueError(
                    f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, f_max={f_max}"
                )
        return self


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the HTK mel scale (unnormalised, peak 1).

    Filter m rises from centre m - 1 to centre m and falls to centre m + 1, the n_mels + 2 centres
    equally spaced in mel between f_min and f_max. With few FFT bins the lowest filters can fall
    between two bins and stay all zero (as in torchaudio); their log-mel row is then constant.
    """
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (F,) FFT bin centres
    edges = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64))
    hz = mel_to_hz(torch.linspace(edges[0], edges[1], n_mels + 2, dtype=torch.float64))  # (M + 2,)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]  # (M,) each
    up = (freqs[:, None] - lo) / (mid - lo)  # (F, M)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def power_spectrogram(wave: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, n_fft // 2 + 1, 1 + T // hop_length) |STFT|^2, frames centred (reflect padding)."""
    spec = torch.stft(
        wave, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    return spec.real.square() + spec.imag.square()


@ENCODERS.register("audio_transformer")
class AudioTransformer(Encoder):
    Config = AudioConfig
    modality = "audio"
    input_ndim = 2

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        if cfg.sample_rate is None or cfg.num_samples is None:
            raise ValueError(
                "audio_transformer needs sample_rate and num_samples (normally from the audio transform)"
            )
        pf, pt = cfg.patch  # AudioConfig checks that they fit n_mels and num_samples
        self.cfg, self.width = cfg, cfg.width
        self.num_prefix_tokens = 1 if cfg.pool == "cls" else 0
        frames = 1 + cfg.num_samples // cfg.hop_length
        self.grid = (cfg.n_mels // pf, math.ceil(frames / pt))  # (mel patches, time patches)
        f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
        fbank = mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate, cfg.f_min, f_max)
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("fbank", fbank, persistent=False)  # (n_freqs, n_mels)
        self.patch_embed = PatchConv(1, cfg.width, cfg.patch)
        # Learnable, initialised to 2-D sin-cos over (mel, time): usable from the first step.
        self.pos_embed = nn.Parameter(sincos_grid(*self.grid, cfg.width).unsqueeze(0))  # (1, Gf, Gt, D)
        if cfg.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        init_weights(self.transformer)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, n_mels, frames) log-mel, standardised per example.

        Per-example standardisation (zero mean, unit variance over the whole spectrogram) replaces
        AST's dataset constants: those depend on the recording level of one corpus, this does not.
        Computed in float32 even under autocast: half precision power spectra underflow.
        """
        with torch.autocast(device_type=wave.device.type, enabled=False):
            window, fbank = self.window.float(), self.fbank.float()  # buffers follow a model's .to(dtype)
            power = power_spectrogram(wave.float(), self.cfg.n_fft, self.cfg.hop_length, window)
            mel = torch.einsum("bft,fm->bmt", power, fbank)  # (B, M, frames)
            x = torch.log(mel + LOG_EPS)
            mean = x.mean(dim=(1, 2), keepdim=True)
            std = x.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
            return (x - mean) / std

    def patches(self, wave: torch.Tensor, targets: bool = False) -> Patches:
        """wave: (B, T) -> its (B, P, D) spectrogram patch tokens with positions, P = Gf * Gt' in
        (mel, time) row-major order; with `targets`, each patch's log-mel values (B, P, pf * pt)
        for masked reconstruction (Audio-MAE)."""
        if wave.shape[1] > self.cfg.num_samples:
            raise ValueError(f"audio of {wave.shape[1]} samples exceeds num_samples {self.cfg.num_samples}")
        mel = self.log_mel(wave)  # (B, M, frames) float32
        pt = self.cfg.patch[1]
        mel = nn.functional.pad(mel, (0, -mel.shape[-1] % pt))  # whole time patches; 0 = the mean
        x = self.patch_embed(mel.to(self.patch_embed.weight.dtype).unsqueeze(1))  # (B, D, Gf, Gt')
        gt = x.shape[-1]  # a shorter clip uses the first positions
        x = (x.permute(0, 2, 3, 1) + self.pos_embed[:, :, :gt]).flatten(1, 2)  # (B, Gf * Gt', D)
        target = patchify(mel.unsqueeze(1), self.cfg.patch) if targets else None
        return Patches(x, target, "values", grid=(self.grid[0], gt))

    def encode_patches(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """(B, P, D) patch tokens -> Tokens of the [CLS and] `keep` (B, K) patches (all when None)."""
        x = keep_patches(x, keep)
        if self.cfg.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return Tokens(self.transformer(self.norm_pre(x)), None)  # (B, [1 +] K, D)

    def forward(self, wave: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """wave: (B, T) float waveform at sample_rate, T <= num_samples; keep: optional (B, K) patches."""
        return self.encode_patches(self.patches(wave).tokens, keep)

    def pool(self, out: Tokens) -> torch.Tensor:
        return out.tokens[:, 0] if self.cfg.pool == "cls" else out.tokens.mean(1)

    @classmethod
    def example_input(cls, cfg: AudioConfig, batch: int = 2) -> torch.Tensor:
        return 0.1 * torch.randn(batch, cfg.num_samples)
