"""`train_and_evaluate(config, workdir)`: build, label, train only the trainable subtree, evaluate.

Everything that can be wrong with a config is found by `setup` before the workdir
is touched, so a bad run writes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from ptune import config as config_lib
from ptune import methods, models, objectives, optim, partition
from ptune.data import batching, tasks
from ptune.data.templates import Template
from ptune.data.tokenizers import ByteTokenizer


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
    label_ids: list[int] | None
    data: dict[str, dict[str, np.ndarray]]
    tx: optax.GradientTransformation | None
    tokenizer: Any

    @property
    def summary(self) -> partition.Summary:
        return partition.summary(self.params, self.labels)


def objective_for(task: tasks.Task, family: str, requested: str) -> str:
    if requested not in ("auto",) + objectives.OBJECTIVES:
        raise ValueError(f"config.task.objective={requested!r}; choose auto or one of {objectives.OBJECTIVES}")
    if task.kind in ("lm", "generate"):   # generate: LM loss on the output given the input
        if requested not in ("auto", "lm"):
            raise ValueError(f"task {task.name!r} is {task.kind}; objective {requested!r} does not apply")
        if family == "bert":
            raise ValueError(f"task {task.name!r} needs a causal model; {family} is an encoder")
        return "lm"
    if requested == "lm":
        raise ValueError(f"task {task.name!r} is classification; use objective verbalizer or head")
    if requested == "auto":
        return "head" if family == "bert" else "verbalizer"
    if requested == "verbalizer" and family == "bert":
        raise ValueError("objective 'verbalizer' needs a language-model head; the bert family has none: use 'head'")
    return requested


def base_model(config):
    """(ModelConfig, pretrained HF-named state dict or None, tokenizer) from config.model.

    `model.checkpoint` is an asset name (see ptune.assets), an HF directory or a .gguf
    file; without one, `model.preset` gives a random-init shape and the byte tokenizer.
    """
    overrides = {k: v for k, v in config.model.to_dict().items() if k not in ("preset", "checkpoint")}
    source = config.model.checkpoint
    if not source:
        return models.model_config(config.model.preset, **overrides), None, ByteTokenizer()
    from ptune import assets
    from ptune.models import checkpoints
    path = assets.ensure(source) if source in assets.ASSETS else source
    hf_config, state = checkpoints.read(path)
    model_cfg = checkpoints.config_from_hf(hf_config, **overrides)
    tokenizer = checkpoints.load_tokenizer(path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer of {source} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model_cfg.vocab_size}; they do not belong together")
    return model_cfg, state, tokenizer


def setup(config) -> Run:
    """Validate the config and build model, method, labels, data and optimizer. Writes nothing."""
    config_lib.check(config)
    task_cfg = config.task
    task = tasks.get(task_cfg.name, **task_cfg.options.to_dict())
    model_cfg, state, tokenizer = base_model(config)
    family = model_cfg.family
    objective = objective_for(task, family, task_cfg.objective)
    if objective == "head":
        model_cfg = dataclasses.replace(model_cfg, num_labels=task.num_classes)

    method = methods.from_config(config.method.to_dict(), model_cfg)
    if objective == "head" and method.trains and "head" not in {p.name for p in method.parts or (method,)}:
        method = methods.compose(method, methods.get("head", model_cfg))   # a fresh head always trains
    if objective == "head" and not method.trains:
        raise ValueError(f"method {method.name!r} trains nothing, so a fresh task head would stay random; "
                         "use config.task.objective='verbalizer' with a decoder")
    extra = method.sites.extra_positions
    if task_cfg.max_length + extra > model_cfg.max_positions:
        raise ValueError(f"task.max_length {task_cfg.max_length} + prompt/prefix length {extra} exceeds the "
                         f"model's context of {model_cfg.max_positions}; shorten one of them")

    if not 0 <= task_cfg.template_index < len(task.templates):
        raise ValueError(f"config.task.template_index={task_cfg.template_index}: task {task.name!r} has "
                         f"{len(task.templates)} templates (0..{len(task.templates) - 1})")
    template = task.templates[task_cfg.template_index]
    if task_cfg.template or method.template:   # a custom text keeps the chosen template's verbalizer
        template = Template(task_cfg.template or method.template, template.verbalizer)
    label_ids = template.label_ids(tokenizer) if objective == "verbalizer" else None
    encode = functools.partial(_encode, task=task, template=template, tokenizer=tokenizer, family=family,
                               max_length=task_cfg.max_length)
    data = {"train": encode(task.split("train")) if method.trains else None,
            config.train.eval_split: encode(task.split(config.train.eval_split))}

    model = models.build(model_cfg, method.sites)
    rng = jax.random.key(config.seed)
    if state is None:
        params = models.init(model, jax.random.fold_in(rng, 0))
    else:
        params = models.from_checkpoint(model, state, jax.random.fold_in(rng, 0))
    ctx = methods.InitContext(jax.random.fold_in(rng, 1), family, tokenizer.encode, template.verbalizer)
    params = method.initialize(params, ctx)
    labels = method.labels(params)

    tx = optimizer(config, method, labels) if method.trains else None
    return Run(config, model, method, params, labels, task, objective, label_ids, data, tx, tokenizer)


def optimizer(config, method: methods.Method, labels, inject: bool = False) -> optax.GradientTransformation:
    """The optimizer over the trainable labels. Each group: the config's default optimizer < the
    method's defaults < optim.groups.<label>. `inject`: learning rates live in the optimizer state
    (see optim.build), as K runs vmapped together need."""
    # A configured group naming no label reaches optim.build, which says so.
    base = {k: v for k, v in config.optim.to_dict().items() if k not in ("groups", "clip_norm")}
    names = list(dict.fromkeys(partition.groups(labels) + list(config.optim.groups.keys())))
    groups = {g: optim.Group(**{**base, **method.optim.get(g, {}), **config.optim.groups.get(g, {})})
              for g in names}
    return optim.build(labels, groups, config.train.steps, config.optim.clip_norm or None, inject=inject)


def _encode(examples, task, template, tokenizer, family, max_length):
    if task.kind == "lm":
        return batching.encode_lm(examples, tokenizer, family, max_length)
    if task.kind == "generate":
        return batching.encode_generate(examples, template, tokenizer, family, max_length)
    return batching.encode_classification(examples, template, tokenizer, family, max_length)


def train_step_fn(run: Run):
    """The un-jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics),
    pure so that it can be jitted (make_train_step) or vmapped over K runs (ptune.multi).

    Gradients are taken with respect to `trainable` only, so XLA never computes
    the frozen weights' gradients.
    """
    def step(trainable, opt_state, frozen, batch, rng):
        def loss_fn(t):
            return objectives.loss(run.model, partition.merge(t, frozen), batch, run.objective,
                                   run.label_ids, rng, deterministic=False)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = run.tx.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(trainable, updates), opt_state, metrics
    return step


def make_train_step(run: Run):
    """jit(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics); trainable and
    optimizer state are donated."""
    return jax.jit(train_step_fn(run), donate_argnums=(0, 1))


def make_eval_step(run: Run):
    return jax.jit(lambda params, batch: objectives.loss(run.model, params, batch, run.objective,
                                                         run.label_ids)[1])


def evaluate(run: Run, params, split: str, eval_step=None) -> dict:
    eval_step = eval_step or make_eval_step(run)
    sums: dict = {}
    for batch in batching.eval_batches(run.data[split], run.config.train.eval_batch_size):
        sums = objectives.accumulate(sums, eval_step(params, batch))
    return objectives.finalize(sums)


class MetricWriter:
    """Metrics to `metrics.jsonl` and TensorBoard event files in the workdir."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(workdir)

    def write(self, step: int, split: str, metrics: dict):
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        self.jsonl.close()
        self.tb.close()


def prepare_workdir(workdir: str):
    """Create the workdir and prove it is writable before any training time is spent."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from None


def start(run: Run, workdir: str) -> tuple[MetricWriter, dict]:
    """Prepare `workdir`, print the summary, write config.json; returns the metric writer and the
    final metrics known before training."""
    prepare_workdir(workdir)
    summary = run.summary
    print(f"method {run.method.name} on {run.config.model.checkpoint or run.config.model.preset}:\n{summary}",
          flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(run.config.to_json_best_effort(indent=2))
    return MetricWriter(workdir), {"method": run.method.name, "trainable_params": summary.trainable,
                                   "trainable_fraction": summary.trainable_fraction}


def finish(run: Run, params, writer: MetricWriter, final: dict, workdir: str, eval_step=None) -> dict:
    """Evaluate the trained `params`, write final_metrics.json (the mark of a finished run)."""
    eval_split, tc = run.config.train.eval_split, run.config.train
    metrics = evaluate(run, params, eval_split, eval_step)
    writer.write(tc.steps if run.method.trains else 0, eval_split, metrics)
    final.update({f"{eval_split}_{k}": v for k, v in metrics.items()})
    writer.close()
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(final, f, indent=2)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()), flush=True)
    return final


def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config` in `workdir`; returns the final metrics (also in final_metrics.json)."""
    run = setup(config)
    writer, final = start(run, workdir)
    params = run.params
    if run.method.trains:
        params = _train(run, writer, final)
    return finish(run, params, writer, final, workdir)


def train_log(sums: dict, steps: int, batch_size: int, seconds: float) -> dict:
    """The logged training metrics from `steps` steps' summed metrics (host floats)."""
    return {"loss": sums["loss_sum"] / max(sums["count"], 1), "grad_norm": sums["grad_norm"] / steps,
            "examples_per_s": steps * batch_size / seconds}


def train_loop(tc, step_fn, state, on_log, on_eval, desc: str):
    """`tc.steps` times `state, metrics = step_fn(state, step)`, shared by one run and K vmapped runs.

    Metrics are summed on the device and fetched only every `tc.log_every` steps (and at the end),
    for `on_log(step, sums, steps, seconds) -> progress-bar postfix`; `on_eval(step, state)` runs
    every `tc.eval_every` steps before the last. Returns the final state.
    """
    from tqdm import tqdm
    sums, t0, steps = {}, time.perf_counter(), 0
    bar = tqdm(range(tc.steps), disable=not tc.progress, desc=desc, dynamic_ncols=True)
    for step in bar:
        state, metrics = step_fn(state, step)
        sums, steps = objectives.accumulate(sums, metrics), steps + 1
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            sums = jax.tree.map(np.asarray, jax.device_get(sums))
            bar.set_postfix(on_log(step + 1, sums, steps, time.perf_counter() - t0))
            sums, t0, steps = {}, time.perf_counter(), 0
        if (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            on_eval(step + 1, state)
    return state


def _train(run: Run, writer: MetricWriter, final: dict):
    tc, seed = run.config.train, run.config.seed
    trainable, frozen = partition.split(run.params, run.labels)
    train_step, eval_step = make_train_step(run), make_eval_step(run)
    dropout_rng = jax.random.fold_in(jax.random.key(seed), 2)

    def step_fn(state, step):
        batch = batching.batch_at(run.data["train"], step, tc.batch_size, seed)
        trainable, opt_state, metrics = train_step(*state, frozen, batch, jax.random.fold_in(dropout_rng, step))
        return (trainable, opt_state), metrics

    def on_log(step, sums, steps, seconds):
        logged = train_log({k: float(v) for k, v in sums.items()}, steps, tc.batch_size, seconds)
        writer.write(step, "train", logged)
        final["train_loss"] = logged["loss"]
        return {"loss": f"{logged['loss']:.4f}", "ex_s": f"{logged['examples_per_s']:.1f}"}

    def on_eval(step, state):
        writer.write(step, tc.eval_split, evaluate(run, partition.merge(state[0], frozen), tc.eval_split, eval_step))

    trainable, _ = train_loop(tc, step_fn, (trainable, run.tx.init(trainable)), on_log, on_eval, run.method.name)
    return partition.merge(trainable, frozen)
