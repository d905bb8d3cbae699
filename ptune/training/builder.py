"""Building a run from a config: the base model, the method (and the fresh head an objective
needs), the objective, the template, the data and the optimizer, validated before anything is
written. Serving and export build only what they need: `setup(config, splits=(), optimizer=False)`
tokenises no data and builds no optimizer."""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import os
from typing import Any

import jax
import numpy as np
import optax

from ptune import config as config_lib
from ptune import methods, models, optim, partition, sharding
from ptune.data import batching, tasks
from ptune.data.templates import Template
from ptune.data.tokenizers import ByteTokenizer
from ptune.errors import UserError
from ptune.training import checkpoint, evals, objectives


@dataclasses.dataclass
class Run:
    """Everything a training run needs, built and validated from a config."""
    config: Any
    model: Any
    method: methods.Method
    params: dict
    labels: dict
    task: tasks.Task
    objective: str
    template: Template
    label_ids: list[int] | None
    data: dict[str, dict[str, np.ndarray]]
    tx: optax.GradientTransformation | None
    tokenizer: Any
    mesh: jax.sharding.Mesh

    @property
    def summary(self) -> partition.Summary:
        return partition.summary(self.params, self.labels)


def objective_for(task: tasks.Task, model_cfg: models.ModelConfig, requested: str) -> str:
    if requested not in ("auto",) + objectives.OBJECTIVES:
        raise UserError(f"config.task.objective={requested!r}; choose auto or one of {objectives.OBJECTIVES}")
    if task.kind in ("lm", "generate", "chat"):   # generate, chat: LM loss on the output / assistant turns
        if requested not in ("auto", "lm"):
            raise UserError(f"task {task.name!r} is {task.kind}; objective {requested!r} does not apply")
        if not model_cfg.causal:
            raise UserError(f"task {task.name!r} needs a causal model; {model_cfg.family} is an encoder")
        return "lm"
    if requested == "lm":
        raise UserError(f"task {task.name!r} is classification; use objective verbalizer or head")
    if requested == "auto":
        return "verbalizer" if model_cfg.causal else "head"
    if requested == "verbalizer" and not model_cfg.causal:
        raise UserError(f"objective 'verbalizer' needs a language-model head; the {model_cfg.family} family has "
                        "none: use 'head'")
    return requested


def base_model(config):
    """(ModelConfig, pretrained HF-named state dict or None, tokenizer) from config.model.

    `model.checkpoint` is an asset name (see ptune.assets), an HF directory or a .gguf
    file; without one, `model.preset` gives a random-init shape and the byte tokenizer.
    """
    overrides = {k: v for k, v in config.model.to_dict().items() if k not in ("preset", "checkpoint")}
    source = config.model.checkpoint
    if not source:
        model_cfg = models.model_config(config.model.preset, **overrides)
        return model_cfg, None, ByteTokenizer(family=model_cfg.family)
    from ptune import assets
    from ptune.models import pretrained
    if source not in assets.ASSETS and not os.path.exists(source):
        raise UserError(f"config.model.checkpoint={source!r} is neither an asset ({sorted(assets.ASSETS)}) nor an "
                        "existing HF directory or .gguf file; fix the name or the path")
    path = assets.ensure(source) if source in assets.ASSETS else source
    hf_config, state = pretrained.read(path)
    model_cfg = pretrained.config_from_hf(hf_config, **overrides)
    tokenizer = pretrained.load_tokenizer(path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer of {source} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"is {model_cfg.vocab_size}; they do not belong together")
    return model_cfg, state, tokenizer


def run_method(config, model_cfg, objective: str) -> methods.Method:
    """config.method, plus a task head that trains when the objective uses a fresh one."""
    method = methods.from_config(config.method.to_dict(), model_cfg)
    if objective == "head" and method.trains and "head" not in {p.name for p in method.parts or (method,)}:
        method = methods.compose(method, methods.get("head", model_cfg))   # a fresh head always trains
    if objective == "head" and not method.trains:
        raise UserError(f"method {method.name!r} trains nothing, so a fresh task head would stay random; "
                        "use config.task.objective='verbalizer' with a decoder")
    return method


def run_template(config, task: tasks.Task, method: methods.Method) -> Template:
    """The task's template chosen by config.task (index or custom text) or by the method."""
    task_cfg = config.task
    if not 0 <= task_cfg.template_index < len(task.templates):
        raise UserError(f"config.task.template_index={task_cfg.template_index}: task {task.name!r} has "
                        f"{len(task.templates)} templates (0..{len(task.templates) - 1})")
    template = task.templates[task_cfg.template_index]
    text = task_cfg.template or method.template or template.text   # a custom text keeps the verbalizer
    if text.count("{text}") != 1:
        raise UserError(f"config.task.template={text!r} must contain the '{{text}}' field exactly once "
                        "(where each example's text goes)")
    if task_cfg.verbalizer:   # the user's words: each must be one token (Template.single_token)
        words = tuple(task_cfg.verbalizer)
        if task.kind != "classify" or len(words) != task.num_classes:
            raise UserError(f"config.task.verbalizer has {len(words)} word(s) {list(words)} but task {task.name!r} "
                            f"has {task.num_classes} classes {list(task.label_names)}; give one word per class")
        return Template(text, words, single_token=True)
    return dataclasses.replace(template, text=text)


def setup(config, training: bool = True, base=None) -> Run:
    """Validate the config and build model, method, labels, data and optimizer. Writes nothing.
    The run's config is `config` as the run used it (see `run_config`). `training=False` builds what
    inference needs (serving, export, a loaded adapter): no split is tokenised, no optimizer built.
    `base`: `base_model(config)` already read (serving K tasks reads their one base once)."""
    config_lib.import_recorded(config)   # a custom method or task the config file registered
    config_lib.check(config)
    task_cfg = config.task
    task = tasks.get(task_cfg.name, **task_cfg.options.to_dict())
    model_cfg, state, tokenizer = base or base_model(config)
    objective = objective_for(task, model_cfg, task_cfg.objective)
    checkpoint.check_options(config, objective)
    if objective == "head":
        model_cfg = dataclasses.replace(model_cfg, num_labels=task.num_classes)
    if config.train.nonfinite not in NONFINITE:
        raise UserError(f"config.train.nonfinite={config.train.nonfinite!r}; choose 'stop' (end the run at a "
                        "non-finite step, naming it) or 'skip' (leave such steps out and count them)")
    method = run_method(config, model_cfg, objective)
    for label in known_labels(method) + list(config.optim.groups):   # before minutes of model loading
        optimizer_group(config, method, label)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_sizes(config.train, sharding.data_parallel_size(mesh))
    extra = method.sites.extra_positions
    if task_cfg.max_length + extra > model_cfg.max_positions:
        raise UserError(f"task.max_length {task_cfg.max_length} + prompt/prefix length {extra} exceeds the "
                        f"model's context of {model_cfg.max_positions}; shorten one of them")
    template = run_template(config, task, method)
    label_ids = template.label_ids(tokenizer) if objective == "verbalizer" else None
    data = {}
    if training:
        encode = encoder(config, task, template, tokenizer, model_cfg.family)
        data = {"train": encode(task.split("train")) if method.trains else None,
                config.train.eval_split: encode(task.split(config.train.eval_split))}

    model = models.build(model_cfg, method.sites)
    ctx = methods.InitContext(jax.random.fold_in(jax.random.key(config.seed), 1), model_cfg.family,
                              tokenizer.encode, template.verbalizer)
    params = method.initialize(base_params(config, model, state), ctx)
    labels = method.labels(params)
    config = run_config(config, method, labels)
    # Frozen leaves are never updated, so bfloat16 storage only rounds them once and halves their
    # memory; trainable leaves (and so their gradients and optimizer state) stay float32.
    params = partition.cast(params, labels, model_cfg.frozen_dtype)
    tx = optimizer(config, method, labels) if training and method.trains else None
    run = Run(config, model, method, params, labels, task, objective, template, label_ids, data, tx, tokenizer, mesh)
    evals.check(run)
    return run


def base_params(config, model, state):
    """The model's parameters before the method initialises its sites: the pretrained `state` (a
    random init of what it lacks, e.g. a fresh head) or, without one, a random init; both drawn from
    config.seed, so that every place that rebuilds a run's base (serving) draws the same one."""
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    return models.init(model, rng) if state is None else models.from_checkpoint(model, state, rng)


NONFINITE = ("stop", "skip")


def encoder(config, task: tasks.Task, template: Template, tokenizer, family: str):
    """The function that encodes a split's examples for a run (setup's splits, and any encoded later)."""
    return functools.partial(batching.encode, kind=task.kind, template=template, tokenizer=tokenizer,
                             family=family, max_length=config.task.max_length, packed=config.task.packing)


def check_batch_sizes(train_cfg, data_parallel: int):
    """Each micro-batch, and each eval batch, is split evenly over the data-parallel devices."""
    accum, batch = train_cfg.grad_accum, train_cfg.batch_size
    if not (isinstance(accum, int) and accum >= 1) or batch % accum:
        raise UserError(f"config.train.grad_accum={accum} must be a positive integer dividing "
                        f"config.train.batch_size={batch}")
    if (batch // accum) % data_parallel:
        raise UserError(f"config.train.batch_size={batch} (in {accum} micro-batch(es)) is not divisible by the "
                        f"{data_parallel} data-parallel devices (mesh data x fsdp); use a multiple of "
                        f"{data_parallel * accum}")
    if train_cfg.eval_batch_size % data_parallel:
        raise UserError(f"config.train.eval_batch_size={train_cfg.eval_batch_size} is not divisible by the "
                        f"{data_parallel} data-parallel devices (mesh data x fsdp)")


def optimizer_group(config, method: methods.Method, label: str) -> optim.Group:
    """The group of `label`: the config's default optimizer < the method's defaults < optim.groups.<label>."""
    base = {k: v for k, v in config.optim.to_dict().items() if k not in ("groups", "clip_norm")}
    own = {k: v for k, v in config.optim.groups.get(label, {}).items() if v is not None}   # None: inherited
    try:
        return optim.Group(**{**base, **method.optim.get(label, {}), **own})
    except ValueError as e:
        raise UserError(f"optimizer group {label!r}: {e}; set config.optim.<key> or "
                        f"config.optim.groups.{label}.<key>") from None


def run_config(config, method: methods.Method, labels):
    """A copy of `config` as the run uses it, for config.json and checkpoints: optim.groups holds each
    trainable label's group, every field filled in (its learning rate, schedule, ...), and relative
    paths of the model and of the files task's data are absolute (so export, serving and
    load_adapter rebuild the run from any working directory)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for label in partition.groups(labels):
            config.optim.groups[label] = dataclasses.asdict(optimizer_group(config, method, label))
        paths = [(config.model, "checkpoint")]
        if config.task.name == "files":
            paths += [(config.task.options, k) for k in ("train", "validation", "test", "dataset")]
        for section, key in paths:
            value = section.get(key)
            if isinstance(value, str) and value and (os.path.exists(value) or glob.glob(value)):
                section[key] = os.path.abspath(value)
    return config


def known_labels(method: methods.Method) -> list[str]:
    """The trainable labels a method names before it sees the parameters (its rule tables and
    optimizer defaults; a label function names its labels only when applied)."""
    rules = [r for part in method.parts or (method,) if not callable(part.rules) for r in part.rules]
    return list(dict.fromkeys([g for _, g in rules if g != partition.FROZEN] + list(method.optim)))


def optimizer(config, method: methods.Method, labels, inject: bool = False) -> optax.GradientTransformation:
    """The optimizer over the trainable labels (see `optimizer_group`). `inject`: learning rates
    live in the optimizer state (see optim.build), as K runs vmapped together need."""
    # A configured group naming no label reaches optim.build, which says so.
    names = list(dict.fromkeys(partition.groups(labels) + list(config.optim.groups.keys())))
    groups = {g: optimizer_group(config, method, g) for g in names}
    return optim.build(labels, groups, config.train.steps, config.optim.clip_norm or None, inject=inject)
