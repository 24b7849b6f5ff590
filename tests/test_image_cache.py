"""The image transform's decoded cache (`cache_mb`): a file is read and decoded once, what comes out
is what decoding every time gives, and the cache stays within its size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coalign.data.sources.base import SampleError
from coalign.data.transforms.image import ImageTransform


def pngs(folder, count: int, size: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("crop", [None, (0.5, 1.0)])
@pytest.mark.parametrize("train", [True, False])
def test_cached_pixels_equal_decoding_every_time(tmp_path, crop, train):
    paths = pngs(tmp_path, 3)
    cached = ImageTransform(size=32, crop_scale=crop, cache_mb=256)
    fresh = ImageTransform(size=32, crop_scale=crop)  # the default: decode every time
    if not train:
        cached.eval(), fresh.eval()
    for epoch in range(2):  # the second epoch comes from the cache
        for i, p in enumerate(paths):
            a = cached(p, np.random.default_rng([epoch, i]))
            b = fresh(p, np.random.default_rng([epoch, i]))
            assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert len(cached._decoded) == 3 and not fresh._decoded
    # resized once to the output size (32 x 32 x 3 bytes) unless crops need the whole image
    assert cached._decoded_bytes == 3 * (40 * 48 * 3 if crop else 32 * 32 * 3)


def test_a_cached_file_is_not_read_again(tmp_path):
    (path,) = pngs(tmp_path, 1)
    t = ImageTransform(size=32, cache_mb=256)
    first = t(path, np.random.default_rng(0))
    Image.new("RGB", (40, 48), "red").save(path)  # changed on disk: the cache answers, unread
    assert torch.equal(t(path, np.random.default_rng(0)), first)
    assert not torch.equal(ImageTransform(size=32)(path, np.random.default_rng(0)), first)


def test_the_cache_keeps_within_its_size_and_still_decodes_the_rest(tmp_path):
    paths = pngs(tmp_path, 5)
    per_image = 32 * 32 * 3
    t = ImageTransform(size=32, cache_mb=2.5 * per_image / 2**20)
    outs = [t(p, np.random.default_rng(0)) for p in paths]
    assert len(t._decoded) == 2 and t._decoded_bytes == 2 * per_image
    assert all(torch.equal(t(p, np.random.default_rng(0)), o) for p, o in zip(paths, outs, strict=True))


def test_a_corrupt_file_raises_every_time_and_is_not_kept(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    t = ImageTransform(size=32, cache_mb=256)
    for _ in range(2):
        with pytest.raises(SampleError, match="corrupt_image|cannot identify"):
            t(str(bad), np.random.default_rng(0))
    assert not t._decoded
