"""ptune: adapting pretrained language models in JAX, every method a mask over one parameter tree."""

import os as _os
import warnings as _warnings

# XLA:CPU's default, concurrency-optimised scheduler runs the backward pass's independent ops side
# by side by keeping every layer's forward activations alive at once: it undoes `model.remat` and
# holds 8-24% more step memory for no measured speed (BUILD_NOTES, issue 8). XLA reads this flag
# from XLA_FLAGS only (a per-jit compiler option is ignored), when its first backend starts; a
# user's own setting of it wins. Accelerator backends ignore it.
_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
_flags = _os.environ.get("XLA_FLAGS", "")
if _SCHEDULER not in _flags:
    _os.environ["XLA_FLAGS"] = f"{_flags} {_SCHEDULER}=false".strip()
    from jax._src import xla_bridge as _xla_bridge

    if getattr(_xla_bridge, "backends_are_initialized", lambda: False)():
        _warnings.warn(f"JAX's backends started before ptune was imported, so XLA:CPU keeps its "
                       f"memory-hungry scheduler (model.remat has no effect on CPU): import ptune "
                       f"first, or set XLA_FLAGS='{_SCHEDULER}=false'", stacklevel=2)

# The Python API (ptune/api.py, docs/API.md), imported on first use so that `import ptune` and
# `from ptune import cli` stay cheap.
__all__ = ["Tuner", "load_adapter", "load_config", "setup"]


def __getattr__(name: str):
    if name in __all__:
        from ptune import api
        return getattr(api, name)
    raise AttributeError(f"module 'ptune' has no attribute {name!r}")
