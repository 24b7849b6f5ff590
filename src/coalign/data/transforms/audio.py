"""Audio transform: decode (array, wav/flac path or bytes) to a mono float32 waveform of fixed length.

The encoder computes its own spectrogram, so this transform only fixes the sample rate and length:
- files are read with `soundfile` (wav, flac, ogg, ...); channels are averaged to mono;
- a file whose sample rate differs from `sample_rate` is resampled in the frequency domain (numpy
  FFT: keep or zero-pad the spectrum up to the new Nyquist). That is band-limited, so downsampling
  does not alias as linear interpolation would; it treats the clip as periodic, so the first and last
  few samples may ring slightly where the clip's ends do not meet;
- the waveform is cropped to `seconds` (a random window in training, the centre in evaluation) or
  zero-padded at the end;
- training adds a random gain (+- `gain_db`) and a small time shift (+- `shift_seconds`, zero-filled).
  Where loudness means something (the world's size: 14 dB between small and large), keep the
  gain range well inside that gap, or the augmentation erases the label.

Arrays are taken to be at `sample_rate` already; integer arrays are scaled by their type's range.
A 2-D array is (samples, channels) or (channels, samples): the shorter axis is the channel axis.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from coalign.data.sources.base import SampleError
from coalign.data.transforms.base import Transform
from coalign.registry import TRANSFORMS, StrictModel


class AudioConfig(StrictModel):
    sample_rate: int = pydantic.Field(16000, ge=1000)
    seconds: float = pydantic.Field(1.0, gt=0.0)  # clip length the encoder sees
    gain_db: float = pydantic.Field(3.0, ge=0.0)  # training only: random gain in [-gain_db, +gain_db]
    shift_seconds: float = pydantic.Field(0.05, ge=0.0)  # training only: random time shift

    @classmethod
    def tiny(cls) -> dict:
        return {"sample_rate": 8000, "seconds": 0.256}  # 2048 samples

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """(T,) at rate_in -> (round(T * rate_out / rate_in),) at rate_out, band-limited (FFT method)."""
    if rate_in == rate_out or len(wave) == 0:
        return wave
    n_in = len(wave)
    n_out = max(1, int(round(n_in * rate_out / rate_in)))
    spectrum = np.fft.rfft(wave.astype(np.float64))  # (n_in // 2 + 1,)
    bins = n_out // 2 + 1
    if bins <= len(spectrum):
        spectrum = spectrum[:bins]  # drop what the new rate cannot hold (anti-aliasing)
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - len(spectrum), spectrum.dtype)])
    return (np.fft.irfft(spectrum, n_out) * (n_out / n_in)).astype(np.float32)


def _to_mono(wave: np.ndarray, where: str) -> np.ndarray:
    if wave.ndim == 2:
        channel_axis = 0 if wave.shape[0] < wave.shape[1] else 1
        wave = wave.mean(axis=channel_axis)
    if wave.ndim != 1:
        raise SampleError("corrupt_audio", f"{where}: array of shape {wave.shape} is not a waveform")
    return wave


def read_audio_file(value: str | Path | bytes | bytearray) -> tuple[np.ndarray, int]:
    """(T,) float32 mono waveform and its sample rate from a path or encoded bytes."""
    try:
        import soundfile
    except ImportError as err:  # not a bad sample: every file would fail, so stop the run
        raise ImportError("reading audio files needs the 'soundfile' package: pip install soundfile") from err
    where = "bytes" if isinstance(value, bytes | bytearray) else str(value)
    if not isinstance(value, bytes | bytearray) and not Path(value).is_file():
        raise SampleError("missing_audio", where)
    try:
        data, rate = soundfile.read(
            io.BytesIO(value) if isinstance(value, bytes | bytearray) else str(value),
            dtype="float32",
            always_2d=True,
        )  # (T, C)
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as err:
        raise SampleError("corrupt_audio", f"{where[:200]}: {err}") from None
    return data.mean(axis=1), int(rate)


def decode_audio(value: Any, sample_rate: int) -> np.ndarray:
    """(T,) float32 mono waveform at `sample_rate`, from an array, tensor, list, path or bytes."""
    if isinstance(value, str | Path | bytes | bytearray):
        wave, rate = read_audio_file(value)
        wave = resample(wave, rate, sample_rate)
    else:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        try:
            wave = np.asarray(value)
        except (ValueError, TypeError) as err:
            raise SampleError("corrupt_audio", f"cannot read a waveform from {type(value).__name__}") from err
        if wave.dtype.kind in "iu":  # PCM: signed around 0, unsigned around half its range
            half = float(2 ** (8 * wave.dtype.itemsize - 1))
            wave = (wave.astype(np.float64) - (half if wave.dtype.kind == "u" else 0.0)) / half
        elif wave.dtype.kind != "f":
            raise SampleError("corrupt_audio", f"waveform of dtype {wave.dtype} is not numeric")
        wave = _to_mono(wave, "array")
    if len(wave) == 0:
        raise SampleError("corrupt_audio", "empty waveform")
    wave = wave.astype(np.float32, copy=False)
    if not np.isfinite(wave).all():
        raise SampleError("corrupt_audio", "waveform has NaN or infinite values")
    return wave


@TRANSFORMS.register("audio")
class AudioTransform(Transform):
    Config = AudioConfig
    modality = "audio"
    shared_with_views = ("sample_rate", "seconds")

    def __init__(self, cfg: AudioConfig | None = None, **kwargs):
        self.cfg = cfg or AudioConfig(**kwargs)

    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        wave = decode_audio(value, self.cfg.sample_rate)
        n = self.cfg.num_samples
        if len(wave) > n:
            start = int(rng.integers(0, len(wave) - n + 1)) if self.train else (len(wave) - n) // 2
            wave = wave[start : start + n]
        out = np.zeros(n, dtype=np.float32)
        out[: len(wave)] = wave
        if self.train:
            out = self._augment(out, rng)
        return torch.from_numpy(out)  # (num_samples,)

    def _augment(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.cfg.gain_db > 0:
            wave = wave * np.float32(10 ** (rng.uniform(-self.cfg.gain_db, self.cfg.gain_db) / 20))
        max_shift = int(round(self.cfg.shift_seconds * self.cfg.sample_rate))
        if max_shift > 0:
            shift = int(rng.integers(-max_shift, max_shift + 1))
            shifted = np.zeros_like(wave)
            if shift >= 0:
                shifted[shift:] = wave[: len(wave) - shift]
            else:
                shifted[:shift] = wave[-shift:]
            wave = shifted
        return wave

    def describe(self) -> dict[str, Any]:
        return {"sample_rate": self.cfg.sample_rate, "num_samples": self.cfg.num_samples}
