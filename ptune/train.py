"""`train_and_evaluate(config, workdir)`: build, label, train only the trainable subtree, evaluate.

Everything that can be wrong with a config is found by `setup` before the workdir
is touched, so a bad run writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import glob
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptune import config as config_lib
from ptune import checkpoint, evals, methods, models, objectives, optim, partition, sharding, stopping
from ptune import workdir as workdir_lib
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
    template: Template
    label_ids: list[int] | None
    data: dict[str, dict[str, np.ndarray]]
    tx: optax.GradientTransformation | None
    tokenizer: Any
    mesh: jax.sharding.Mesh

    @property
    def summary(self) -> partition.Summary:
        return partition.summary(self.params, self.labels)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each array of a run lives on the mesh (see ptune.sharding)."""
    trainable: Any
    frozen: Any
    opt_state: Any
    batch: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding

    @property
    def params(self):
        return partition.merge(self.trainable, self.frozen)


def layout(run: Run, trainable, frozen) -> Layout:
    mesh, mesh_cfg = run.mesh, run.config.mesh
    boxed = models.abstract_params(run.model)
    trainable_sh = sharding.param_shardings(trainable, boxed, mesh, mesh_cfg)
    opt_sh = None
    if run.tx is not None:
        opt_sh = sharding.state_shardings(jax.eval_shape(run.tx.init, trainable), trainable, trainable_sh, mesh)
    return Layout(trainable_sh, sharding.param_shardings(frozen, boxed, mesh, mesh_cfg), opt_sh,
                  sharding.batch_sharding(mesh), sharding.replicated(mesh))


def objective_for(task: tasks.Task, family: str, requested: str) -> str:
    if requested not in ("auto",) + objectives.OBJECTIVES:
        raise ValueError(f"config.task.objective={requested!r}; choose auto or one of {objectives.OBJECTIVES}")
    if task.kind in ("lm", "generate", "chat"):   # generate, chat: LM loss on the output / assistant turns
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
        model_cfg = models.model_config(config.model.preset, **overrides)
        return model_cfg, None, ByteTokenizer(family=model_cfg.family)
    from ptune import assets
    from ptune.models import checkpoints
    if source not in assets.ASSETS and not os.path.exists(source):
        raise ValueError(f"config.model.checkpoint={source!r} is neither an asset ({sorted(assets.ASSETS)}) nor an "
                         "existing HF directory or .gguf file; fix the name or the path")
    path = assets.ensure(source) if source in assets.ASSETS else source
    hf_config, state = checkpoints.read(path)
    model_cfg = checkpoints.config_from_hf(hf_config, **overrides)
    tokenizer = checkpoints.load_tokenizer(path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer of {source} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model_cfg.vocab_size}; they do not belong together")
    return model_cfg, state, tokenizer


def run_method(config, model_cfg, objective: str) -> methods.Method:
    """config.method, plus a task head that trains when the objective uses a fresh one."""
    method = methods.from_config(config.method.to_dict(), model_cfg)
    if objective == "head" and method.trains and "head" not in {p.name for p in method.parts or (method,)}:
        method = methods.compose(method, methods.get("head", model_cfg))   # a fresh head always trains
    if objective == "head" and not method.trains:
        raise ValueError(f"method {method.name!r} trains nothing, so a fresh task head would stay random; "
                         "use config.task.objective='verbalizer' with a decoder")
    return method


def run_template(config, task: tasks.Task, method: methods.Method) -> Template:
    """The task's template chosen by config.task (index or custom text) or by the method."""
    task_cfg = config.task
    if not 0 <= task_cfg.template_index < len(task.templates):
        raise ValueError(f"config.task.template_index={task_cfg.template_index}: task {task.name!r} has "
                         f"{len(task.templates)} templates (0..{len(task.templates) - 1})")
    template = task.templates[task_cfg.template_index]
    text = task_cfg.template or method.template or template.text   # a custom text keeps the verbalizer
    if text.count("{text}") != 1:
        raise ValueError(f"config.task.template={text!r} must contain the '{{text}}' field exactly once "
                         "(where each example's text goes)")
    if task_cfg.verbalizer:   # the user's words: each must be one token (Template.single_token)
        words = tuple(task_cfg.verbalizer)
        if task.kind != "classify" or len(words) != task.num_classes:
            raise ValueError(f"config.task.verbalizer has {len(words)} word(s) {list(words)} but task {task.name!r} "
                             f"has {task.num_classes} classes {list(task.label_names)}; give one word per class")
        return Template(text, words, single_token=True)
    return dataclasses.replace(template, text=text)


def setup(config) -> Run:
    """Validate the config and build model, method, labels, data and optimizer. Writes nothing.
    The run's config is `config` as the run used it (see `run_config`)."""
    config_lib.import_recorded(config)   # a custom method or task the config file registered
    config_lib.check(config)
    task_cfg = config.task
    task = tasks.get(task_cfg.name, **task_cfg.options.to_dict())
    model_cfg, state, tokenizer = base_model(config)
    family = model_cfg.family
    objective = objective_for(task, family, task_cfg.objective)
    checkpoint.check_options(config, objective)
    if objective == "head":
        model_cfg = dataclasses.replace(model_cfg, num_labels=task.num_classes)

    if config.train.nonfinite not in NONFINITE:
        raise ValueError(f"config.train.nonfinite={config.train.nonfinite!r}; choose 'stop' (end the run at a "
                         "non-finite step, naming it) or 'skip' (leave such steps out and count them)")
    method = run_method(config, model_cfg, objective)
    for label in known_labels(method) + list(config.optim.groups):   # before minutes of model loading
        optimizer_group(config, method, label)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_sizes(config.train, sharding.data_parallel_size(mesh))
    extra = method.sites.extra_positions
    if task_cfg.max_length + extra > model_cfg.max_positions:
        raise ValueError(f"task.max_length {task_cfg.max_length} + prompt/prefix length {extra} exceeds the "
                         f"model's context of {model_cfg.max_positions}; shorten one of them")

    template = run_template(config, task, method)
    label_ids = template.label_ids(tokenizer) if objective == "verbalizer" else None
    encode = encoder(config, task, template, tokenizer, family)
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
    config = run_config(config, method, labels)
    # Frozen leaves are never updated, so bfloat16 storage only rounds them once and halves their
    # memory; trainable leaves (and so their gradients and optimizer state) stay float32.
    params = partition.cast(params, labels, model_cfg.frozen_dtype)

    tx = optimizer(config, method, labels) if method.trains else None
    run = Run(config, model, method, params, labels, task, objective, template, label_ids, data, tx, tokenizer, mesh)
    evals.check(run)
    return run


NONFINITE = ("stop", "skip")


def encoder(config, task: tasks.Task, template: Template, tokenizer, family: str):
    """The function that encodes a split's examples for a run (setup's splits, and any encoded later)."""
    return functools.partial(batching.encode, kind=task.kind, template=template, tokenizer=tokenizer,
                             family=family, max_length=config.task.max_length, packed=config.task.packing)


def check_batch_sizes(train_cfg, data_parallel: int):
    """Each micro-batch, and each eval batch, is split evenly over the data-parallel devices."""
    accum, batch = train_cfg.grad_accum, train_cfg.batch_size
    if not (isinstance(accum, int) and accum >= 1) or batch % accum:
        raise ValueError(f"config.train.grad_accum={accum} must be a positive integer dividing "
                         f"config.train.batch_size={batch}")
    if (batch // accum) % data_parallel:
        raise ValueError(f"config.train.batch_size={batch} (in {accum} micro-batch(es)) is not divisible by the "
                         f"{data_parallel} data-parallel devices (mesh data x fsdp); use a multiple of "
                         f"{data_parallel * accum}")
    if train_cfg.eval_batch_size % data_parallel:
        raise ValueError(f"config.train.eval_batch_size={train_cfg.eval_batch_size} is not divisible by the "
                         f"{data_parallel} data-parallel devices (mesh data x fsdp)")


def optimizer_group(config, method: methods.Method, label: str) -> optim.Group:
    """The group of `label`: the config's default optimizer < the method's defaults < optim.groups.<label>."""
    base = {k: v for k, v in config.optim.to_dict().items() if k not in ("groups", "clip_norm")}
    own = {k: v for k, v in config.optim.groups.get(label, {}).items() if v is not None}   # None: inherited
    try:
        return optim.Group(**{**base, **method.optim.get(label, {}), **own})
    except ValueError as e:
        raise ValueError(f"optimizer group {label!r}: {e}; set config.optim.<key> or "
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


def train_step_fn(run: Run):
    """The un-jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics),
    pure so that it can be jitted (make_train_step) or vmapped over K runs (ptune.multi).

    Gradients are taken with respect to `trainable` only, so XLA never computes the frozen
    weights' gradients. With `train.grad_accum` = k the batch is split into k micro-batches
    whose summed-loss gradients are added and divided by the whole batch's count once, so the
    update equals the one-batch update.

    A step whose loss or gradient norm is not finite is not applied: trainable and optimizer
    state come back unchanged, its metrics are zeroed and `nonfinite` is 1 (the host decides,
    by config.train.nonfinite, whether the run stops). A finite step's result is unchanged bitwise.
    """
    accum = run.config.train.grad_accum

    def grads_of(trainable, frozen, batch, rng):
        def loss_sum(t):
            _, metrics = objectives.loss(run.model, partition.merge(t, frozen), batch, run.objective,
                                         run.label_ids, rng, deterministic=False)
            return metrics["loss_sum"], metrics
        (_, metrics), grads = jax.value_and_grad(loss_sum, has_aux=True)(trainable)
        return grads, metrics

    def step(trainable, opt_state, frozen, batch, rng):
        if accum == 1:
            grads, metrics = grads_of(trainable, frozen, batch, rng)
        else:
            # Micro-batch i takes rows i, i+k, ...: rows stay spread over the data-parallel devices.
            micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
                                 batch)

            def add(total, i):
                mb = jax.tree.map(lambda x: x[i], micro)
                return jax.tree.map(jnp.add, total, grads_of(trainable, frozen, mb, jax.random.fold_in(rng, i))), None
            shapes = jax.eval_shape(grads_of, trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, metrics), _ = jax.lax.scan(add, zeros, jnp.arange(accum))
        grads = jax.tree.map(lambda g: g / jnp.maximum(metrics["count"], 1), grads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(metrics["grad_norm"])

        def apply(trainable, opt_state):
            updates, opt_state = run.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state
        trainable, opt_state = jax.lax.cond(finite, apply, lambda t, o: (t, o), trainable, opt_state)
        metrics = jax.tree.map(lambda m: jnp.where(finite, m, jnp.zeros_like(m)), metrics)
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        return trainable, opt_state, metrics
    return step


def make_train_step(run: Run, where: Layout | None = None):
    """`train_step_fn` jitted with the layout's shardings; trainable and optimizer state are donated."""
    if where is None:
        return jax.jit(train_step_fn(run), donate_argnums=(0, 1))
    return jax.jit(train_step_fn(run), donate_argnums=(0, 1),
                   in_shardings=(where.trainable, where.opt_state, where.frozen, where.batch, where.replicated),
                   out_shardings=(where.trainable, where.opt_state, where.replicated))


def make_eval_step(run: Run, where: Layout | None = None):
    fn = lambda params, batch: objectives.loss(run.model, params, batch, run.objective, run.label_ids)[1]
    if where is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(where.params, where.batch), out_shardings=where.replicated)


def evaluate(run: Run, params, split: str, eval_step=None, where: Layout | None = None) -> dict:
    """Mean metrics of `params` on `split` (and its `count`), with a progress bar of its own while it runs."""
    from tqdm import tqdm
    eval_step = eval_step or make_eval_step(run, where)
    sums: dict = {}
    size, rows = run.config.train.eval_batch_size, len(next(iter(run.data[split].values())))
    show = run.config.train.progress and jax.process_index() == 0
    for batch in tqdm(batching.eval_batches(run.data[split], size), desc=f"evaluating {split}", unit="batch",
                      total=-(-rows // size), leave=False, disable=not show, dynamic_ncols=True):
        if where is not None:
            batch = sharding.put_batch(batch, where.batch)
        sums = objectives.accumulate(sums, eval_step(params, batch))
    return objectives.finalize(sharding.to_host(sums))


class MetricWriter:
    """Metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only:
    in a multi-host job every process holds the same replicated metrics)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(workdir)

    def write(self, step: int, split: str, metrics: dict):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


def dropout_key(seed: int):
    """The key that `fold_in(key, step)` turns into a training step's dropout key."""
    return jax.random.fold_in(jax.random.key(seed), 2)


def start(run: Run, workdir: str) -> tuple[MetricWriter, dict]:
    """Print the summary and write config.json (process 0); returns the metric writer and the
    final metrics known before training. The workdir must have passed `workdir.prepare`."""
    summary = run.summary
    if jax.process_index() == 0:
        print(f"method {run.method.name} on {run.config.model.checkpoint or run.config.model.preset} "
              f"(mesh {dict(run.mesh.shape)}):\n{summary}", flush=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(run.config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "task.json"), "w") as f:   # what predictions' class indices mean
            json.dump({"name": run.task.name, "kind": run.task.kind,
                       "label_names": list(tasks.class_names(run.task, run.template)), "template": run.template.text, "verbalizer": list(run.template.verbalizer),
                       "files": run.task.files}, f, indent=2)
    return MetricWriter(workdir), {"method": run.method.name, "steps": run.config.train.steps,
                                   "trainable_params": summary.trainable,
                                   "trainable_percent": 100 * summary.trainable_fraction}


def finish(run: Run, writer: MetricWriter, final: dict, workdir: str, metrics: dict, params,
           where: Layout | None = None) -> dict:
    """Add the final evaluation's `metrics` and the evaluation suite's (config.eval, on the final
    `params`) and write final_metrics.json (the mark of a finished run); print them and what the
    workdir holds."""
    final.update({f"{run.config.train.eval_split}_{k}": v for k, v in metrics.items()})
    final.update(evals.run_suite(run, params, workdir, where))
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, workdir_lib.FINAL), "w") as f:
            json.dump(final, f, indent=2)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()), flush=True)
        print(f"wrote {workdir}: {workdir_lib.contents(workdir)}", flush=True)
    return final


def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint if it has one; returns the
    final metrics (also in final_metrics.json). The run owns the workdir while it runs (a second
    run on it is refused, see ptune.workdir); a finished run's workdir is left as it is, unless
    more steps are asked for, which resume from its last checkpoint."""
    run = setup(config)
    workdir_lib.prepare(workdir, checkpoint.space_needed(run))
    with workdir_lib.owned(workdir):
        # Opening validates and reads the newest checkpoint: a run that cannot resume (another method,
        # shape, base or data order) stops here, before anything in the workdir changes.
        checkpoints = checkpoint.Checkpoints(workdir, run, dropout_key(config.seed)) if run.method.trains else None
        done = workdir_lib.finished(workdir)
        if done is not None and not (run.method.trains and config.train.steps > done["steps"]):
            if jax.process_index() == 0:
                print(f"{workdir} already holds a finished run of {done['steps']} steps ({workdir_lib.FINAL}): "
                      "nothing to do; raise config.train.steps to train further, or choose another --workdir",
                      flush=True)
            if checkpoints:
                checkpoints.close()
            return done
        start_step = checkpoints.start_step if checkpoints and checkpoints.manager else 0
        if done is not None and not start_step:
            raise ValueError(f"{workdir} holds a finished run of {done['steps']} steps but no checkpoint to train "
                             "further from (config.checkpoint.every_steps=0); choose another --workdir")
        # Records a killed run logged past its checkpoint (all, when it starts afresh) go before the
        # writer opens metrics.jsonl: the file is replaced, and records written to the old one would be lost.
        checkpoint.truncate_metrics(workdir, start_step if start_step else -1)
        return _run(run, workdir, checkpoints)


def _run(run: Run, workdir: str, checkpoints: checkpoint.Checkpoints | None) -> dict:
    writer, final = start(run, workdir)
    if checkpoints and checkpoints.manager and writer.active:
        print(f"base sha256 {checkpoints.base['sha256'][:16]} ({checkpoints.base_hash_seconds:.2f} s)", flush=True)
        if checkpoints.start_step:
            print(f"resuming from step {checkpoints.start_step} of {checkpoints.directory}", flush=True)
    trainable, frozen = partition.split(run.params, run.labels)
    where = layout(run, trainable, frozen)
    trainable, frozen = sharding.put(trainable, where.trainable), sharding.put(frozen, where.frozen)
    eval_step = make_eval_step(run, where)
    if run.method.trains:
        with stop_on_signals() as stop_requested:
            metrics, trainable = _train(run, trainable, frozen, where, eval_step, writer, final, checkpoints,
                                        stop_requested)
        checkpoints.close()
    else:
        metrics = evaluate(run, partition.merge(trainable, frozen), run.config.train.eval_split, eval_step, where)
        writer.write(0, run.config.train.eval_split, metrics)
    return finish(run, writer, final, workdir, metrics, partition.merge(trainable, frozen), where)


@dataclasses.dataclass(frozen=True)
class Logged:
    """Summed step metrics (host numpy; a leading axis K for K vmapped runs) since the last log."""
    sums: dict
    steps: int
    seconds: float

    def train_metrics(self, batch_size: int, point: int | None = None) -> dict:
        """The logged training metrics (of one `point` of K vmapped runs): means over the steps, and
        `count`, what the loss averages over (examples, or predicted tokens)."""
        sums = {k: float(v if point is None else v[point]) for k, v in self.sums.items()}
        applied = self.steps - sums["nonfinite"]   # a non-finite step's metrics are zeros
        return {"loss": sums["loss_sum"] / max(sums["count"], 1), "grad_norm": sums["grad_norm"] / max(applied, 1),
                "count": round(sums["count"]), "skipped_steps": int(sums["nonfinite"]),
                "examples_per_s": self.steps * batch_size / self.seconds}


def train_steps(tc, step_fn, state, start_step: int, desc: str, show: bool):
    """Run `state, metrics = step_fn(state, step)` from `start_step` to `tc.steps`, shared by one run
    and K vmapped runs; yields (steps done, state, Logged or None) after every step.

    Metrics are summed on the device and fetched only every `tc.log_every` steps and at the end,
    so the host never waits on a step in between. The progress bar shows the mean loss and
    examples/s over all runs.
    """
    from tqdm import tqdm
    sums, t0, steps = {}, time.perf_counter(), 0
    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps, disable=not (tc.progress and show),
               desc=desc, dynamic_ncols=True)
    for step in bar:
        state, metrics = step_fn(state, step)
        sums, steps, done = objectives.accumulate(sums, metrics), steps + 1, step + 1
        logged = None
        if done % tc.log_every == 0 or done == tc.steps:
            logged = Logged(sharding.to_host(sums), steps, time.perf_counter() - t0)
            count = logged.sums["count"]
            bar.set_postfix(loss=f"{logged.sums['loss_sum'].sum() / max(count.sum(), 1):.4f}",
                            ex_s=f"{steps * tc.batch_size * count.size / logged.seconds:.1f}")
        yield done, state, logged
        if logged:   # after the caller's evaluation and checkpoint, so examples/s times steps only
            sums, t0, steps = {}, time.perf_counter(), 0


class Preempted(Exception):
    """Training stopped on SIGTERM or SIGINT (Ctrl-C) after saving a checkpoint of the step it had reached."""

    def __init__(self, step: int, directory: str | None, signum: int = signal.SIGTERM):
        where = f"saved checkpoint step {step} in {directory}" if directory else \
            f"at step {step} with no checkpoint (config.checkpoint.every_steps=0)"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; rerun the same command to resume")
        self.step, self.signum = step, signum


@contextlib.contextmanager
def stop_on_signals():
    """While training, SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) asks the step loop
    to save and stop after the current step; yields the function that returns that signal's number
    (None until one came). A second signal exits at once, as SIGKILL would: the checkpoints on disk
    stay loadable, and a save it cuts short is never read and is cleaned up by the next run. A job of
    several processes keeps the defaults (immediate exit): they could see the signal at different
    steps and would then wait for each other's saves forever; they resume from the last periodic
    checkpoint."""
    requested = []
    if jax.process_count() > 1:
        yield lambda: None
        return

    def handle(signum, _):   # os.write: the signal may arrive inside a print to the same stream
        name = signal.Signals(signum).name
        if requested:
            os.write(2, f"\n{name} again: exiting at once; the checkpoints on disk are kept\n".encode())
            os._exit(128 + signum)
        requested.append(signum)
        os.write(2, f"\n{name}: saving after this step, then stopping (again: exit at once)\n".encode())
    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: requested[0] if requested else None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_finite(pending: list, mode: str, checkpoints: checkpoint.Checkpoints | None = None):
    """Raise naming the first of the `pending` (step, device flag) pairs whose step was not finite,
    unless `mode` is 'skip'; empties `pending`. Called only where the host waits for the device
    anyway (log and save steps), so the flags cost no extra synchronisation."""
    flags = jax.device_get([flag for _, flag in pending])
    bad = next((step for (step, _), flag in zip(pending, flags) if flag), None)
    pending.clear()
    if bad is None or mode == "skip":
        return
    kept = f"checkpoint step {checkpoints.manager.latest_step()} is kept" if checkpoints and \
        checkpoints.manager and checkpoints.manager.latest_step() else "no checkpoint was written"
    raise ValueError(f"training step {bad + 1}: the loss or gradients are not finite, so the step was not applied "
                     f"and the run stopped ({kept}); lower config.optim.learning_rate or set config.optim.clip_norm, "
                     "or set config.train.nonfinite='skip' to leave such steps out")


def init_opt_state(run: Run, where: Layout, trainable):
    return jax.jit(run.tx.init, out_shardings=where.opt_state)(trainable)


def make_step_fn(run: Run, where: Layout, frozen, pending: list):
    """`step_fn((trainable, opt_state), step)` for `train_steps`: the train step on step `step`'s batch
    and dropout key, which depend only on the seed and the step (so resumed runs and the Python
    API's steps equal uninterrupted ones); each step's non-finite flag (on the device) goes to
    `pending` for `check_finite`."""
    tc, seed = run.config.train, run.config.seed
    train_step, keys = make_train_step(run, where), dropout_key(seed)

    def step_fn(state, step):
        batch = sharding.put_batch(batching.batch_at(run.data["train"], step, tc.batch_size, seed), where.batch)
        *state, metrics = train_step(*state, frozen, batch, jax.random.fold_in(keys, step))
        pending.append((step, metrics["nonfinite"]))
        return tuple(state), metrics
    return step_fn


def _train(run: Run, trainable, frozen, where: Layout, eval_step, writer: MetricWriter, final: dict,
           checkpoints: checkpoint.Checkpoints, stop_requested=lambda: None) -> dict:
    """Steps from the newest checkpoint (or 0) to train.steps, evaluating every `eval_every` steps and
    after the last, saving when due; returns the last evaluation's metrics and the trained subtree
    (with train.patience: the best evaluation's, and training stops when patience runs out, see
    ptune.stopping). A non-finite step stops the run before anything later is saved
    (config.train.nonfinite='stop') or is skipped and counted in the train records' `skipped_steps`
    ('skip'); `stop_requested()` (the number of a signal, see stop_on_signals) saves the step reached
    and raises `Preempted`."""
    from tqdm import tqdm
    tc = run.config.train
    first, trainable, opt_state = checkpoints.resume(trainable, init_opt_state(run, where, trainable), where)
    best = resumed_best(run, checkpoints, trainable, where) if tc.patience else None
    pending = []   # (step, device flag: not finite) since the last check
    step_fn = make_step_fn(run, where, frozen, pending)
    evaluated, done = None, first
    for done, (trainable, opt_state), logged in train_steps(tc, step_fn, (trainable, opt_state), first,
                                                            run.method.name, writer.active):
        preempted, now = stop_requested(), None
        if logged or checkpoints.due(done) or preempted:
            check_finite(pending, tc.nonfinite, checkpoints)
        if logged:
            metrics = logged.train_metrics(tc.batch_size)
            writer.write(done, "train", metrics)
            final["train_loss"] = metrics["loss"]
        if done % tc.eval_every == 0 or done == tc.steps or checkpoints.needs_metrics(done):
            evaluated = now = evaluate(run, partition.merge(trainable, frozen), tc.eval_split, eval_step, where)
            writer.write(done, tc.eval_split, evaluated)
        improved = bool(now and best and best.update(done, [now], trainable)[0])
        # With early stopping an improving evaluation is saved, and only those are ranked (ties with the
        # best are not), so that the kept best is the one a resumed run ends on.
        ranked = now if not best or improved else None
        saved = checkpoints.save(done, trainable, opt_state, ranked, force=preempted is not None or improved)
        if saved:
            tqdm.write(checkpoint.describe(saved))
        if preempted:
            raise Preempted(done, checkpoints.directory if checkpoints.manager else None, preempted)
        if best and best.stop:
            break
    if best:
        final.update(best.final(0, done))
        return best.metrics[0], best.trainable
    if evaluated is None:   # training ended in a run stopped before its final evaluation
        evaluated = evaluate(run, partition.merge(trainable, frozen), tc.eval_split, eval_step, where)
    return evaluated, trainable


def resumed_best(run: Run, checkpoints: checkpoint.Checkpoints, trainable, where: Layout):
    """Early stopping's record of a run starting at its checkpoint: the evaluations before it (from
    metrics.jsonl), and the best one's parameters (the resumed ones, or the kept best checkpoint)."""
    best = stopping.Best(run.config)
    if not checkpoints.start_step:
        return best
    best.replay(os.path.dirname(checkpoints.directory), run.config.train.eval_split)
    if best.value[0] is not None:
        best.keep(trainable if best.step[0] == checkpoints.start_step else
                  checkpoints.restore_trainable(best.step[0], where))
    return best
