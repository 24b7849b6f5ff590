"""The HTTP search service and its web page, over a `coalign.search.query.SearchIndex`.

Imports are lazy so that `coalign.cli` can register the `serve` command without loading FastAPI.
"""

__all__ = ["Limits", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from coalign.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'coalign.serve' has no attribute '{name}'")
