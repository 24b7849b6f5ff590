"""Import every module that registers a part, so the registries are complete.

Discovery is by package: a new objective is one new file in `coalign/objectives/` with one
decorator, and nothing else to edit (DESIGN.md). Modules are imported in sorted order so that
registration is deterministic.
"""

import importlib
import pkgutil

PACKAGES = [
    "coalign.data.sources",
    "coalign.data.transforms",
    "coalign.data",  # world.py
    "coalign.models.encoders",
    "coalign.models",  # heads.py
    "coalign.objectives",
    "coalign.evaluate",
]


def _import_all() -> None:
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda m: m.name):
            if not info.ispkg:
                importlib.import_module(f"{package}.{info.name}")


_import_all()
