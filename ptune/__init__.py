"""ptune: adapting pretrained language models in JAX, every method a mask over one parameter tree."""

# The Python API (ptune/api.py, docs/API.md), imported on first use so that `import ptune` and
# `from ptune import cli` stay cheap.
__all__ = ["Tuner", "load_adapter", "load_config", "setup"]


def __getattr__(name: str):
    if name in __all__:
        from ptune import api
        return getattr(api, name)
    raise AttributeError(f"module 'ptune' has no attribute {name!r}")
