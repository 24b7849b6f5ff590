"""Per-modality transforms; each registers itself in `coalign.registry.TRANSFORMS`."""

from coalign.data.transforms.base import Pipeline, Transform

__all__ = ["Pipeline", "Transform"]
