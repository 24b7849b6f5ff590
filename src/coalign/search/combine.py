"""Combined queries: a text and an image as one query vector (`coalign search --text T --image I`,
`SearchIndex.encode_query`, and the server's `combined` search field). Numpy only, so the server's
request handling imports it without the model."""

from __future__ import annotations

import numpy as np

from coalign.registry import ConfigError

COMBINE = ("sum", "product")


def combine_vectors(parts: list[np.ndarray], weights: list[float], combine: str = "sum") -> np.ndarray:
    """(1, E) float32, normalised: one query from the normalised embeddings `parts` (E,) of its parts.
    "sum": their sum weighted by `weights` (one per part, >= 0, not all 0; only their ratio matters);
    "product": their elementwise product (weights unused)."""
    if not parts:
        raise ConfigError("a query needs a text, an image or both")
    if combine == "product":
        q = np.prod(parts, axis=0)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(parts) or not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ConfigError(f"query weights must be >= 0 and not all 0, got {tuple(weights)}")
        w = w / w.max()  # only the ratio counts: 1e308 and 1e-320 neither over- nor underflow
        q = np.sum([v * np.asarray(p, np.float64) for v, p in zip(w, parts, strict=True)], axis=0)
    norm = np.linalg.norm(q)
    if not norm > 0:
        raise ConfigError("the combined query vector is zero; give other weights or combine='sum'")
    return (q / norm)[None].astype(np.float32)
