"""The config schema: every knob with its default. Experiment files start from
`base_config()` and change what they need; `check(config)` rejects keys that do not exist."""

from __future__ import annotations

import dataclasses
import inspect

import ml_collections
from ml_collections import config_dict

from ptune import evals, methods, sharding
from ptune.optim import Group


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # model.checkpoint: an asset name, HF directory or .gguf file with pretrained weights; without
    # one, model.preset names a random-init shape in ptune.models.config.PRESETS. Any ModelConfig
    # field given beside them overrides the shape. The precision and memory knobs are listed so
    # that command-line overrides find them: dtype (compute), frozen_dtype (storage of frozen
    # leaves), remat (per-block rematerialisation; see ptune.models.config.REMAT).
    c.model = ml_collections.ConfigDict({"preset": "gpt2-tiny", "checkpoint": "", "dtype": "float32",
                                         "frozen_dtype": "float32", "remat": "none"})
    # method.name is a registered method or 'a+b'; its options sit beside it (or under method.<part>).
    c.method = ml_collections.ConfigDict({"name": "lora"})
    c.task = ml_collections.ConfigDict(dict(
        name="synthetic_sentiment",
        options=ml_collections.ConfigDict(),   # passed to the task builder
        objective="auto",                      # auto | lm | verbalizer | head
        max_length=64,
        template_index=0,                      # which of the task's paraphrased templates
        template="",                           # a custom template text ('' = the indexed one)
        verbalizer=(),                         # custom label words, one per class (() = the template's)
        packing=False,                         # lm/generate/chat: several examples per row (ptune.data.packing)
    ))
    c.optim = ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(Group)})
    c.optim.clip_norm = 1.0
    c.optim.groups = ml_collections.ConfigDict()  # label -> overrides of the fields above
    c.train = ml_collections.ConfigDict(dict(
        steps=100, batch_size=16, eval_batch_size=64, eval_every=50, log_every=10,
        eval_split="validation", progress=True,
        grad_accum=1,                          # micro-batches per step (equal to the whole batch at once)
        nonfinite="stop",                      # a step with a non-finite loss/gradient: stop | skip (never applied)
    ))
    # Devices as a (data, fsdp, tensor) mesh; -1 = the rest. rules: logical parameter axis -> mesh
    # axes ("" replicates). Method sites are replicated unless their path matches shard_sites.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, shard_sites="",
                                            rules=ml_collections.ConfigDict(sharding.DEFAULT_RULES)))
    # Adapter-only checkpoints in <workdir>/checkpoints (ptune.checkpoint); a run restarted on
    # the same workdir resumes from the newest one.
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=100,            # save every N steps and after the last step; 0: no checkpoints
        keep=2,                     # keep the newest N
        keep_best=0,                # also keep the best N by the eval best_metric (each save then evaluates)
        best_metric="loss",         # loss | accuracy (classification) | perplexity (lm)
        best_mode="min",            # min | max
        allow_base_mismatch=False,  # resume even if the frozen base's sha256 differs from the checkpoint's
    ))
    # The final evaluation suite, run once after training (see ptune.evals).
    c.eval = ml_collections.ConfigDict(evals.DEFAULTS)
    return c


def with_method(config: ml_collections.ConfigDict, name: str, **options) -> ml_collections.ConfigDict:
    """Set config.method to `name` with every option it accepts at its default (so that
    command-line overrides such as --config.method.rank=16 find their key)."""
    def defaults(part):
        if part not in methods.REGISTRY:
            raise ValueError(f"unknown method {part!r}; choose one of {sorted(methods.REGISTRY)}")
        params = list(inspect.signature(methods.REGISTRY[part]).parameters.values())[1:]
        # A None default becomes a typed placeholder so --config.method.<option>=... can set it.
        return {p.name: config_dict.placeholder(str) if p.default is None else p.default for p in params}

    parts = name.split("+")
    if len(parts) == 1:
        body = {**defaults(name), **options}
    else:
        body = {p: {**defaults(p), **options.get(p, {})} for p in parts}
    config.method = ml_collections.ConfigDict({"name": name, **body}, type_safe=False)
    return config


def with_task(config: ml_collections.ConfigDict, name: str, **options) -> ml_collections.ConfigDict:
    """Set config.task.name to `name` with every option its builder accepts at its default (so that
    command-line overrides such as --config.task.options.train=data.jsonl find their key)."""
    from ptune.data import tasks
    if name not in tasks.REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(tasks.REGISTRY)}")
    unknown = sorted(set(options) - set(inspect.signature(tasks.REGISTRY[name]).parameters))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}")
    defaults = {}
    for p in inspect.signature(tasks.REGISTRY[name]).parameters.values():
        if p.default is None:   # a typed placeholder, so that an override can set it
            defaults[p.name] = config_dict.placeholder(int if "int" in str(p.annotation) else str)
        elif p.default is not inspect.Parameter.empty:
            defaults[p.name] = p.default
    config.task.name = name
    config.task.options = ml_collections.ConfigDict({**defaults, **options}, type_safe=False)
    return config


def check(config) -> None:
    """Unknown keys outside the open sections (model, method, task.options, optim.groups, mesh.rules)."""
    base = base_config()
    for section in ("", "task", "optim", "train", "mesh", "checkpoint", "eval"):
        have = config.get(section) if section else config
        want = base.get(section) if section else base
        unknown = sorted(set(have.keys()) - set(want.keys()))
        if unknown:
            where = f"config.{section}." if section else "config."
            raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; "
                             f"valid: {sorted(want.keys())}")
    fields = {f.name for f in dataclasses.fields(Group)}
    for label, overrides in config.optim.groups.items():
        unknown = sorted(set(overrides.keys()) - fields)
        if unknown:
            raise ValueError(f"config.optim.groups.{label} has unknown key(s) {unknown}; valid: {sorted(fields)}")
