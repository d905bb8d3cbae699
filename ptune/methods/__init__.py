"""Methods by name. Each module's `make(model_config, **options) -> Method`.

    method = methods.get("lora", model_config, rank=16)
    hybrid = methods.compose(methods.get("lora", cfg), methods.get("prompt", cfg, length=20))
    methods.register("mine", my_make)     # research code, from outside the package
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from ptune.errors import UserError
from ptune.methods import (
    adapter,
    bitfit,
    dora,
    full,
    head,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    manual,
    prefix,
    prompt,
    ptuning,
    ptuning_v2,
    vera,
)
from ptune.methods.base import InitContext, Method, compose
from ptune.models.model_config import ModelConfig

__all__ = ["REGISTRY", "InitContext", "Method", "compose", "from_config", "get", "register"]

REGISTRY: dict[str, Callable[..., Method]] = {
    m.__name__.rsplit(".", 1)[-1]: m.make
    for m in (full, bitfit, head, lora, adapter, prefix, prompt, ptuning_v2, ia3, manual, dora, ptuning, ln_tuning,
              vera, loha, lokr)
}


def register(name: str, make: Callable[..., Method]):
    """Add a method: `make(model_config, **options) -> Method`."""
    if "+" in name:
        raise UserError(f"method name {name!r} may not contain '+' (that composes methods)")
    REGISTRY[name] = make


def get(name: str, model_config, **options) -> Method:
    """One method, or a '+'-joined hybrid whose options are given per part: get("lora+prompt",
    cfg, lora={"rank": 4}, prompt={"length": 10})."""
    if not isinstance(name, str):
        raise UserError(f"method name {name!r} must be a string such as 'lora' or 'lora+prompt'")
    if not isinstance(model_config, ModelConfig):
        raise UserError(f"methods.get({name!r}, ...): model_config is a {type(model_config).__name__}, not a "
                        "ModelConfig; pass ptune.models.model_config('gpt2') (a preset) or the model's .config")
    names = name.split("+")
    if len(names) > 1:
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UserError(f"method {name!r}: options {unknown} belong to no part; "
                            f"give them as method.<part>.<option>, parts: {names}")
        loose = next((n for n in names if not isinstance(options.get(n, {}), Mapping)), None)
        if loose:
            raise UserError(f"method {name!r}: the options of part {loose!r} are {options[loose]!r}; give a dict "
                            f"such as {loose}={{'option': value}}")
        return compose(*(get(n, model_config, **options.get(n, {})) for n in names))
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {sorted(REGISTRY)} or join them with '+'")
    make = REGISTRY[name]
    allowed = [p for p in inspect.signature(make).parameters][1:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"method {name!r} has no option(s) {unknown}; its options are {allowed}")
    return make(model_config, **options)


def from_config(method_config: Mapping, model_config) -> Method:
    """From a config dict: {"name": "lora", "rank": 8} or {"name": "lora+prompt", "lora": {...}}."""
    if not isinstance(method_config.get("name"), str):
        raise UserError(f"method config {dict(method_config)!r} has no name; give config.method.name, e.g. 'lora'")
    options = {k: (dict(v) if isinstance(v, Mapping) else v)
               for k, v in dict(method_config).items() if k != "name"}
    return get(method_config["name"], model_config, **options)
