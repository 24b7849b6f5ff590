"""Audio, point-cloud and tabular encoders: features against brute force, invariances, and a tiny
overfit check that each one can tell synthetic classes apart."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from coalign.models.encoders.audio import hz_to_mel, mel_filterbank, mel_to_hz, power_spectrogram
from coalign.models.encoders.points import farthest_point_sample, knn
from coalign.registry import ENCODERS
from parts import tiny_encoder, tiny_encoder_options

# What these tests assert on (patch grids, column layouts), over each encoder's tiny settings and the
# inputs of its modality's tiny transform (8 kHz audio of 2048 samples, clouds of 128 points with RGB).
LAYOUT = {
    "audio_transformer": {"n_fft": 256, "hop_length": 128, "n_mels": 32, "patch": (8, 4)},
    "point_transformer": {},
    "tabular_transformer": {"numeric": 3, "categories": [4, 2]},
    "tabular_mlp": {"numeric": 3, "categories": [4, 2]},
}
POOLED = ["audio_transformer", "point_transformer", "tabular_transformer"]  # those with a pool option


def build(name: str, **overrides):
    return tiny_encoder(name, **{**LAYOUT[name], **overrides})


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "name,pool", [(n, p) for n in POOLED for p in ("cls", "mean")] + [("tabular_mlp", None)]
)
def test_shapes_and_gradients_reach_every_parameter(name, pool):
    torch.manual_seed(0)
    enc = build(name, **({"pool": pool} if pool else {}))
    x = ENCODERS.get(name).example_input(enc.cfg, batch=3)
    out = enc(x)
    B, N, D = out.tokens.shape
    assert (3, enc.width) == (B, D) and out.mask is None  # fixed-size inputs: no padding
    assert enc.num_prefix_tokens < N and enc.num_prefix_tokens == (1 if pool == "cls" else 0)
    pooled = enc.pool(out)
    assert pooled.shape == (3, enc.width) and torch.isfinite(pooled).all()
    pooled.square().sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", list(LAYOUT))
def test_deterministic_and_independent_of_the_rest_of_the_batch(name):
    torch.manual_seed(0)
    enc = build(name).eval()
    x = ENCODERS.get(name).example_input(enc.cfg, batch=4)
    full = enc.pool(enc(x))
    torch.testing.assert_close(full, enc.pool(enc(x)), rtol=0, atol=0)
    torch.testing.assert_close(full[2:3], enc.pool(enc(x[2:3])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,missing",
    [
        ("audio_transformer", "sample_rate"),
        ("point_transformer", "channels"),
        ("tabular_transformer", "categories"),
        ("tabular_mlp", "numeric"),
    ],
)
def test_inputs_from_the_transform_are_required(name, missing):
    options = {**tiny_encoder_options(name, **LAYOUT[name]), missing: None}  # as if no transform said
    with pytest.raises(ValueError, match=f"needs .*{missing}|needs {missing}"):
        ENCODERS.create(name, **options)


# ------------------------------------------------------------------------------------------- audio


def test_mel_filterbank_matches_the_triangle_formula():
    sr, n_fft, n_mels, f_min, f_max = 16000, 400, 40, 20.0, 7600.0
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sr, f_min, f_max)
    assert fb.shape == (n_fft // 2 + 1, n_mels)

    def mel(f):
        return 2595 * math.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    step = (mel(f_max) - mel(f_min)) / (n_mels + 1)
    centres = [hz(mel(f_min) + i * step) for i in range(n_mels + 2)]
    expected = np.zeros((n_fft // 2 + 1, n_mels))
    for k in range(n_fft // 2 + 1):
        f = k * sr / n_fft
        for m in range(n_mels):
            lo, mid, hi = centres[m], centres[m + 1], centres[m + 2]
            if lo <= f <= mid:
                expected[k, m] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                expected[k, m] = (hi - f) / (hi - mid)
    np.testing.assert_allclose(fb.numpy(), expected, atol=1e-5)
    assert (fb.max(0).values > 0.5).all()  # every filter catches a bin at this resolution
    freqs = torch.tensor([0.0, 440.0, 8000.0])
    torch.testing.assert_close(mel_to_hz(hz_to_mel(freqs)), freqs)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(201, 40, 16000, 0.0, 9000.0)


def test_power_spectrogram_matches_numpy_fft_per_frame():
    rng = np.random.default_rng(0)
    n_fft, hop = 64, 16
    wave = rng.standard_normal(300).astype(np.float32)
    window = torch.hann_window(n_fft)
    spec = power_spectrogram(torch.from_numpy(wave)[None], n_fft, hop, window)[0].numpy()
    assert spec.shape == (n_fft // 2 + 1, 1 + 300 // hop)
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")  # frames are centred
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    for t in [0, 5, spec.shape[1] - 1]:
        frame = padded[t * hop : t * hop + n_fft] * hann
        np.testing.assert_allclose(spec[:, t], np.abs(np.fft.rfft(frame)) ** 2, rtol=1e-4, atol=1e-3)


def test_a_pure_tone_peaks_in_its_mel_bin():
    sr, n_fft, n_mels = 16000, 400, 40
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sr, 0.0, sr / 2)
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(sr / 2.0))), n_mels + 2))[1:-1]
    t = torch.arange(sr) / sr
    for m in [8, 20, 33]:
        tone = torch.sin(2 * math.pi * float(centres[m]) * t + 0.3)[None]
        mel = torch.einsum("bft,fm->bm", power_spectrogram(tone, n_fft, 160, torch.hann_window(n_fft)), fb)
        assert int(mel.argmax()) == m


def test_audio_tokens_follow_the_patch_grid_and_shorter_clips_use_fewer():
    enc = build("audio_transformer")  # 2048 samples / hop 128 -> 17 frames -> 5 time x 4 mel patches
    assert enc.grid == (4, 5)
    assert enc(torch.randn(2, 2048)).tokens.shape == (2, 1 + 20, 32)
    assert enc(torch.randn(2, 1024)).tokens.shape == (2, 1 + 4 * 3, 32)  # 9 frames -> 3 time patches
    with pytest.raises(ValueError, match="num_samples"):
        enc(torch.randn(2, 4096))
    with pytest.raises(ValueError, match="divisible"):
        build("audio_transformer", patch=(5, 4))


def test_audio_embedding_ignores_loudness():
    """Per-example standardisation of the log-mel: a gain is a shift in log space, removed."""
    torch.manual_seed(0)
    enc = build("audio_transformer").eval()
    wave = 0.1 * torch.randn(2, 2048)
    torch.testing.assert_close(enc.pool(enc(wave)), enc.pool(enc(4 * wave)), rtol=1e-3, atol=1e-3)


def test_silence_is_finite():
    enc = build("audio_transformer").eval()
    assert torch.isfinite(enc.pool(enc(torch.zeros(1, 2048)))).all()


# ------------------------------------------------------------------------------------------ points


def fps_brute(xyz: np.ndarray, count: int) -> list[int]:
    start = int(np.argmax(((xyz - xyz.mean(0)) ** 2).sum(1)))
    chosen = [start]
    while len(chosen) < count:
        d = [min(((p - xyz[c]) ** 2).sum() for c in chosen) for p in xyz]
        chosen.append(int(np.argmax(d)))
    return chosen


def test_farthest_point_sampling_matches_brute_force():
    torch.manual_seed(0)
    xyz = torch.rand(3, 60, 3)
    got = farthest_point_sample(xyz, 10)
    for b in range(3):
        assert got[b].tolist() == fps_brute(xyz[b].double().numpy(), 10)


def test_knn_matches_brute_force():
    torch.manual_seed(0)
    xyz, query = torch.rand(2, 50, 3), torch.rand(2, 7, 3)
    got = knn(query, xyz, 6)
    for b in range(2):
        for g in range(7):
            d = ((xyz[b].double() - query[b, g].double()) ** 2).sum(1).numpy()
            assert got[b, g].tolist() == np.argsort(d)[:6].tolist()


def test_groups_are_relative_to_their_centre_and_keep_channels():
    torch.manual_seed(0)
    enc = build("point_transformer")
    points = torch.randn(2, 128, 6)
    centres, patches = enc.group(points)
    G, k = enc.cfg.groups, enc.cfg.group_size
    assert centres.shape == (2, G, 3) and patches.shape == (2, G, k, 6)
    # Each centre is a point of the cloud, so it is its own nearest neighbour: offset 0, its own colour.
    torch.testing.assert_close(patches[:, :, 0, :3], torch.zeros(2, G, 3))
    colours = {tuple(p.tolist()) for p in points[0, :, 3:]}
    assert all(tuple(c.tolist()) in colours for c in patches[0, :, :, 3:].reshape(-1, 3))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_point_order_does_not_change_the_output(pool):
    torch.manual_seed(0)
    enc = build("point_transformer", pool=pool).eval()
    points = torch.randn(2, 128, 6)
    perm = torch.randperm(128)
    a, b = enc(points), enc(points[:, perm])
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)


def test_points_reject_wrong_channels_and_small_clouds():
    enc = build("point_transformer")
    with pytest.raises(ValueError, match="expects 6"):
        enc(torch.randn(2, 128, 3))
    with pytest.raises(ValueError, match="smaller than groups"):
        enc(torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match="num_points"):
        build("point_transformer", groups=500)


# ----------------------------------------------------------------------------------------- tabular


def test_numeric_tokens_are_affine_and_nan_becomes_the_missing_token():
    torch.manual_seed(0)
    enc = build("tabular_transformer")
    tok = enc.tokenizer
    x = torch.tensor([[0.5, float("nan"), -2.0, 3.0, 1.0], [float("nan"), 1.0, 0.0, float("nan"), 0.0]])
    out = tok(x)  # (2, 5, 32)
    torch.testing.assert_close(out[0, 0], 0.5 * tok.weight[0] + tok.bias[0])
    torch.testing.assert_close(out[0, 2], -2.0 * tok.weight[2] + tok.bias[2])
    torch.testing.assert_close(out[0, 1], tok.missing[1])
    torch.testing.assert_close(out[1, 0], tok.missing[0])
    # Categorical: field 0 (4 categories) at rows 0..4 of the table (4 = missing), field 1 from row 5.
    torch.testing.assert_close(out[0, 3], tok.embed.weight[3] + tok.cat_bias[0])
    torch.testing.assert_close(out[1, 3], tok.embed.weight[4] + tok.cat_bias[0])  # NaN -> missing row
    torch.testing.assert_close(out[0, 4], tok.embed.weight[5 + 1] + tok.cat_bias[1])
    # NaN inputs give finite outputs and finite gradients everywhere. (Not .sum(): the sum of a
    # LayerNorm output over channels is constant, so its gradient vanishes.)
    enc.pool(enc(x)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())
    assert tok.weight.grad[1].abs().sum() > 0  # the NaN in row 0 does not block row 1's gradient


def test_missing_differs_from_any_value():
    torch.manual_seed(0)
    enc = build("tabular_transformer").eval()
    x = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]]).repeat(3, 1)
    x[1, 0] = float("nan")
    x[2, 0] = 0.0
    emb = enc.pool(enc(x))
    assert not torch.allclose(emb[0], emb[1]) and torch.allclose(emb[0], emb[2])


@pytest.mark.parametrize("bad", [4.0, -1.0, 1.5])
def test_category_out_of_range_names_the_column(bad):
    enc = build("tabular_transformer")
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, bad, 1.0]])
    with pytest.raises(ValueError, match=r"column 3 \(categorical field 0\).*row 1.*0\.\.3"):
        enc(x)


def test_wrong_number_of_columns_is_an_error():
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        build("tabular_mlp")(torch.zeros(2, 4))


def test_numeric_only_and_categorical_only_tables():
    enc = build("tabular_transformer", numeric=0, categories=[3])
    assert enc(torch.tensor([[2.0], [float("nan")]])).tokens.shape == (2, 2, 32)
    enc = build("tabular_mlp", numeric=2, categories=[])
    assert enc(torch.tensor([[2.0, float("nan")]])).tokens.shape == (1, 1, 32)


# ------------------------------------------------------------------------ tiny overfit sanity check


def tones(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure tones at 300 / 900 / 2500 Hz (8 kHz audio), random phase and level."""
    y = torch.arange(n) % 3
    freq = torch.tensor([300.0, 900.0, 2500.0])[y] * (1 + 0.03 * torch.randn(n, generator=gen))
    t = torch.arange(2048) / 8000
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    level = 0.05 + torch.rand(n, 1, generator=gen)
    return level * torch.sin(2 * math.pi * freq[:, None] * t + phase), y


def shapes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Spheres, cubes and flat discs (points uniform on the surface), centred and scaled to the unit
    ball as a points transform would; the colour channels are noise."""
    y = torch.arange(n) % 3
    v = torch.randn(n, 128, 3, generator=gen)
    sphere = v / v.norm(dim=-1, keepdim=True)
    side = 2 * torch.rand(n, 128, 3, generator=gen) - 1
    face = torch.randint(0, 3, (n, 128, 1), generator=gen)
    sign = 2 * torch.randint(0, 2, (n, 128, 1), generator=gen).float() - 1
    cube = side.scatter(2, face, sign)  # one coordinate pinned to +-1
    disc = sphere * torch.tensor([1.0, 1.0, 0.0]) * torch.rand(n, 128, 1, generator=gen).sqrt()
    xyz = torch.where((y == 0)[:, None, None], sphere, torch.where((y == 1)[:, None, None], cube, disc))
    xyz = xyz - xyz.mean(1, keepdim=True)
    xyz = xyz / xyz.norm(dim=-1).amax(1)[:, None, None]
    return torch.cat([xyz, torch.rand(n, 128, 3, generator=gen)], dim=-1), y


def table(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three clusters in the numeric columns; the categories are noise; 20% of numbers missing."""
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    num = centres[y] + 0.5 * torch.randn(n, 3, generator=gen)
    num[torch.rand(n, 3, generator=gen) < 0.2] = float("nan")
    cat = torch.stack([torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen)], 1)
    return torch.cat([num, cat.float()], dim=1), y


@pytest.mark.parametrize(
    "name,data",
    [
        ("audio_transformer", tones),
        ("point_transformer", shapes),
        ("tabular_transformer", table),
        ("tabular_mlp", table),
    ],
)
def test_each_encoder_learns_to_separate_synthetic_classes(name, data):
    """40 full-batch steps on 48 samples fit the training set and do well above chance (1/3) on new
    samples. Mean pooling: a CLS readout starts from a near-zero attention path (0.02 init) and needs
    a higher learning rate or more steps at depth 1; the features are what this checks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    enc = build(name, **({"pool": "mean"} if name in POOLED else {}))
    head = nn.Linear(enc.width, 3)
    groups = [{"params": enc.parameters()}, {"params": head.parameters(), "lr": 3e-2}]
    opt = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.0)
    x, y = data(48, gen)
    for _ in range(40):
        loss = nn.functional.cross_entropy(head(enc.pool(enc(x))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    x_new, y_new = data(60, gen)  # unseen samples
    with torch.no_grad():
        fit = (head(enc.pool(enc(x))).argmax(1) == y).float().mean()
        held_out = (head(enc.pool(enc(x_new))).argmax(1) == y_new).float().mean()
    assert fit >= 0.95 and held_out >= 0.65, f"{name}: train {fit:.2f}, held-out {held_out:.2f}"
