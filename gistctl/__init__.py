"""gistctl: learned context compression with gist tokens.

    import gistctl
    gc = gistctl.load()
    blob = gc.compress(text); blob.save("doc.kv")
    print(gc.ask("doc.kv", "question?").text)

The names below load torch and transformers on first use, so `import gistctl` stays fast.
"""

__version__ = "0.2.0"

_API = {"load": "gistctl.engine", "load_for_blob": "gistctl.engine", "Gistctl": "gistctl.engine",
        "Blob": "gistctl.engine", "Answer": "gistctl.engine"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gistctl' has no attribute '{name}'")
