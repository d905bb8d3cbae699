"""Adapter-only checkpoints with Orbax, exact resume and a loader for serving.

A checkpoint holds what training changes and nothing else: the trainable subtree, the
optimizer state and a JSON record (step, dropout key, data position, method, config, base
identity and hash, shapes and a sha256 of every saved array). The frozen base is never
written: it is reloaded from its source, and its sha256 must equal the recorded one.

    <workdir>/checkpoints/<step>/trainable/   Orbax PyTree: the adapter (the artifact to ship)
                                 opt_state/   Orbax PyTree: needed only to resume training
                                 meta/        JSON record (see `_record`)
                                 metrics/     the eval metrics keep-best ranks by (Orbax's)

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
save killed half way leaves the previous steps intact; the leftover is removed on the next
open. Training data order is a pure function of (seed, step) (`batching.batch_at`) and the
dropout key of a step is `fold_in(dropout_key, step)`, so resuming needs only the step,
the trainable subtree and the optimizer state; the record's data position and key are
checked, not replayed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ptune import atomic, partition, sharding
from ptune.errors import UserError

DIRECTORY = "checkpoints"
FORMAT = 1
# Orbax deletes a step it no longer keeps with rmtree, which a kill can leave half done: a step
# directory that looks complete but is not. It renames such steps into TRASH instead (atomic),
# and ptune empties TRASH after each save and on open.
TRASH = "deleted"


def check_options(config, objective: str) -> None:
    """Value errors in `config.checkpoint`, found before a run writes anything."""
    c = config.checkpoint   # its integers are range-checked by config.check
    if c.best_mode not in ("min", "max"):
        raise UserError(f"config.checkpoint.best_mode={c.best_mode!r}; choose 'min' or 'max'")
    metrics = ("loss", "perplexity") if objective == "lm" else ("loss", "accuracy")
    if (c.keep_best or config.train.patience) and c.best_metric not in metrics:
        raise UserError(f"config.checkpoint.best_metric={c.best_metric!r} is not an eval metric of the "
                        f"{objective} objective; choose one of {metrics}")



def fingerprint(tree) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in partition.flatten(tree).items():
        array = sharding.to_host(leaf)   # a leaf sharded across processes is all-gathered
        digest.update(f"{path}:{array.dtype.str}:{array.shape};".encode())
        # As bytes: a buffer of bfloat16 (frozen_dtype) cannot be hashed directly.
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def shapes(tree) -> dict[str, str]:
    """{path: 'float32[64,8]'} for every leaf (arrays or ShapeDtypeStructs)."""
    return {p: f"{np.dtype(x.dtype).name}{list(x.shape)}" for p, x in partition.flatten(tree).items()}


def base_identity(config) -> dict:
    """Where the frozen base comes from: an asset name, a local path, or a random-init preset."""
    from ptune import assets
    source = config.model.checkpoint
    overrides = {k: v for k, v in config.model.to_dict().items() if k not in ("preset", "checkpoint")}
    if not source:
        return {"preset": config.model.preset, "seed": config.seed, "overrides": overrides}
    path = assets.path(source) if source in assets.ASSETS else os.path.abspath(source)
    return {"checkpoint": source, "path": str(path), "overrides": overrides}


def data_position(data: dict, config, step: int) -> dict:
    """What fixes the batch of every step: the training arrays, the seed and the batch size. An
    encoding memory-mapped from its cache (ptune.data.batching) counts by its file, whose name is a
    fingerprint of the data set and the encoding: reading gigabytes on every save would cost time
    and pull the whole file into memory."""
    digest = hashlib.sha256()
    for name in sorted(data):
        digest.update(name.encode())
        array = data[name]
        digest.update(os.path.basename(os.path.dirname(array.filename)).encode() if isinstance(array, np.memmap) else
                      np.ascontiguousarray(array).data)
    return {"step": step, "seed": config.seed, "batch_size": config.train.batch_size,
            "examples": len(next(iter(data.values()))), "sha256": digest.hexdigest()}


def options_of(config):
    """config.checkpoint as the run applies it: with early stopping (train.patience) the best
    evaluation's step is always kept, so that a resumed run can still end on it."""
    options = copy.deepcopy(config.checkpoint)
    if config.train.patience and not options.keep_best:
        options.keep_best = 1
    return options


def space_needed(run) -> int:
    """Bytes the run's checkpoints take at most: `keep` + `keep_best` saved steps plus the one
    being written, each its trainable subtree, optimizer state and ~64 kB of metadata."""
    options = options_of(run.config)
    if not (run.method.trains and options.every_steps):
        return 0
    trainable = partition.split(jax.eval_shape(lambda: run.params), run.labels)[0]
    arrays = jax.tree.leaves((trainable, jax.eval_shape(run.tx.init, trainable)))
    per_step = sum(x.size * np.dtype(x.dtype).itemsize for x in arrays) + 64_000
    return per_step * (options.keep + options.keep_best + 1)


def sizes(step_directory: str) -> dict[str, int]:
    """Bytes on disk of a saved step: the adapter artifact (trainable/ + meta/) and the whole
    resume checkpoint. Not a result of training: Orbax's own metadata varies by a few hundred bytes."""
    def du(*parts):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(*parts))
                   for f in files)
    return {"adapter_bytes": du(step_directory, "trainable") + du(step_directory, "meta"),
            "checkpoint_bytes": du(step_directory)}


def _training_manager(directory: str, options) -> ocp.CheckpointManager:
    """Keep the newest `keep` steps and, with keep_best, the best `keep_best` by the eval metric."""
    best_fn = (lambda metrics: metrics[options.best_metric]) if options.keep_best else None
    policy = [policies.LatestN(n=options.keep)]
    if best_fn:
        policy.append(policies.BestN(get_metric_fn=best_fn, reverse=options.best_mode == "min",
                                     n=options.keep_best, keep_checkpoints_without_metrics=False))
    # best_fn also makes Orbax store each save's metrics (BestN ranks by them). Saves are
    # synchronous: an adapter saves in milliseconds, and the next train step donates its arrays.
    return _orbax_manager(directory, ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(policy), best_fn=best_fn, best_mode=options.best_mode,
        enable_async_checkpointing=False, cleanup_tmp_directories=True, todelete_subdir=TRASH))


def _restore_tree(manager, step: int, item: str, target=None):
    """`item` of `step` as numpy arrays, structured like `target` (default: as saved)."""
    like = manager.item_metadata(step)[item].tree if target is None else target
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), like)
    return manager.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)}))[item]


def _verified(manager, directory: str, step: int, item: str, record: dict, target=None):
    """Saved `item` of `step`, its bytes checked against the record's sha256."""
    try:
        tree = _restore_tree(manager, step, item, target)
    except Exception as e:
        raise _damaged(directory, step, manager, e) from None
    if fingerprint(tree) != record["sha256"][item]:
        raise _damaged(directory, step, manager, f"{item} bytes differ from the recorded sha256")
    return tree


def _orbax_manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    handlers = {"trainable": ocp.PyTreeCheckpointHandler(), "opt_state": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers, options=options)


def _read_record(manager, step: int, directory: str) -> dict:
    try:
        record = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:   # Orbax/tensorstore raise many types for a damaged directory
        raise _damaged(directory, step, manager, e) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise _damaged(directory, step, manager, "its meta record is missing or not a ptune record")
    return record


def _damaged(directory: str, step: int, manager, why) -> UserError:
    """The error for an unreadable step; the fix names the step to fall back to."""
    older = [s for s in manager.all_steps() if s < step]
    where = f"{directory}/{step}"
    fix = f"delete {where} to resume from step {older[-1]}" if older else f"delete {where} to start over"
    why = f"{type(why).__name__}: {why}" if isinstance(why, Exception) else why
    return UserError(f"checkpoint {where} is damaged ({str(why)[:300]}); {fix}, or use a fresh --workdir")


def _compare(kind: str, saved: dict[str, str], expected: dict[str, str], where: str):
    """A saved tree must match the run's exactly: name the first differing key and both shapes."""
    fix = "use the config the checkpoint was written with, or a fresh --workdir"
    for path in expected:
        if path not in saved:
            raise UserError(f"checkpoint {where} has no {kind} {path!r} ({expected[path]}) that this run "
                            f"trains; {fix}")
        if saved[path] != expected[path]:
            raise UserError(f"{kind} {path!r} is {saved[path]} in checkpoint {where} but {expected[path]} "
                            f"in this run; {fix}")
    extra = [p for p in saved if p not in expected]
    if extra:
        raise UserError(f"checkpoint {where} has {kind} {extra[0]!r} ({saved[extra[0]]}) that this run "
                        f"does not train ({len(extra)} such); {fix}")


class Checkpoints:
    """The checkpoints of one run in `<workdir>/checkpoints`.

    Opening validates the newest checkpoint against the run (method, shapes, base hash,
    data position, dropout key) and reads it, so a checkpoint that cannot be resumed is
    refused before the run writes anything. Every process calls `save` (Orbax
    coordinates the hosts); Orbax writes the JSON record and metrics from the primary host.
    """

    def __init__(self, workdir: str, run, dropout_key):
        self.run, self.options = run, options_of(run.config)
        self.directory = os.path.join(workdir, DIRECTORY)
        self.manager, self.restored = None, None
        if not self.options.every_steps:
            return
        trainable, frozen = partition.split(jax.eval_shape(lambda: run.params), run.labels)
        self.targets = {"trainable": trainable, "opt_state": jax.eval_shape(run.tx.init, trainable)}
        self.expected = {kind: shapes(tree) for kind, tree in self.targets.items()}
        t0 = time.perf_counter()
        self.base = base_record(run.config, partition.split(run.params, run.labels)[1])
        self.base_hash_seconds = time.perf_counter() - t0
        self.dropout_key = np.asarray(jax.random.key_data(dropout_key)).tolist()
        self.manager = _training_manager(self.directory, self.options)
        self.restored = self._restore_latest()
        self._empty_trash()   # after the checks: a refused resume changes nothing

    def _empty_trash(self):
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, TRASH), ignore_errors=True)

    @property
    def start_step(self) -> int:
        return self.restored["step"] if self.restored else 0

    def _restore_latest(self) -> dict | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        where = f"{self.directory}/{step}"
        record = _read_record(self.manager, step, self.directory)
        if step > self.run.config.train.steps:
            raise UserError(f"checkpoint {where} is past config.train.steps={self.run.config.train.steps}; set "
                            f"train.steps >= {step} to continue it, or use a fresh --workdir")
        if record["method"] != self.run.method.name:
            raise UserError(f"checkpoint {where} was written by method {record['method']!r} but this run uses "
                            f"{self.run.method.name!r}; set config.method.name={record['method']!r} or use a "
                            f"fresh --workdir")
        for kind in ("trainable", "opt_state"):
            _compare(kind, record["shapes"][kind], self.expected[kind], where)
        check_base(record["base"], self.base, where, self.options.allow_base_mismatch)
        self._check_position(record, step, where)
        state = {kind: _verified(self.manager, self.directory, step, kind, record, self.targets[kind])
                 for kind in ("trainable", "opt_state")}
        return {"step": step, **state}

    def _check_position(self, record: dict, step: int, where: str):
        now = data_position(self.run.data["train"], self.run.config, step)
        for key, value in record["data"].items():
            if now[key] != value:
                raise UserError(f"checkpoint {where} was written with data {key}={value!r} but this run has "
                                f"{now[key]!r}, so the batches after step {step} would differ; restore the "
                                "seed, batch size and task data, or use a fresh --workdir")
        if record["rng"]["dropout_key"] != self.dropout_key:
            raise UserError(f"checkpoint {where} has dropout key {record['rng']['dropout_key']} but this run "
                            f"derives {self.dropout_key} (config.seed changed?); use a fresh --workdir")

    def resume(self, trainable, opt_state, where=None):
        """(start step, trainable, opt_state): the restored state, laid out by `where` (a
        `compute.Layout`; host arrays without one), or the fresh state at step 0 when there is
        nothing to resume."""
        if not self.restored:
            return 0, trainable, opt_state
        restored = self.restored["trainable"], self.restored["opt_state"]
        if where is not None:
            restored = sharding.put(restored, (where.trainable, where.opt_state))
        return (self.restored["step"], *restored)

    def due(self, step: int) -> bool:
        """A checkpoint is written every `every_steps` steps and after the last one."""
        every = self.options.every_steps
        return bool(every) and (step % every == 0 or step == self.run.config.train.steps)

    def needs_metrics(self, step: int) -> bool:
        """Keep-best ranks checkpoints by eval metrics, so a save step must be evaluated."""
        return self.due(step) and self.options.keep_best > 0

    def restore_trainable(self, step: int, where=None):
        """The trainable subtree saved at `step` (checked against its recorded sha256)."""
        record = _read_record(self.manager, step, self.directory)
        trainable = _verified(self.manager, self.directory, step, "trainable", record, self.targets["trainable"])
        return trainable if where is None else sharding.put(trainable, where.trainable)

    def save(self, step: int, trainable, opt_state, metrics: dict | None = None, force: bool = False) -> dict | None:
        """Save `step` if it is due, or if `force` (a preemption, an early-stopping best) and checkpoints
        are on; returns the sizes written ({} on processes other than 0). `metrics`: the evaluation of
        this step, None if it was not evaluated (keep-best then never ranks the save)."""
        due = self.due(step)
        if not (due or force and self.manager):
            return None
        record = self._record(step, trainable, opt_state)
        self.manager.save(step, args=ocp.args.Composite(
            trainable=ocp.args.PyTreeSave(trainable), opt_state=ocp.args.PyTreeSave(opt_state),
            meta=ocp.args.JsonSave(record)),
            metrics={self.options.best_metric: metrics[self.options.best_metric]}
            if self.options.keep_best and metrics is not None else None,
            force=True)
        self._empty_trash()
        if jax.process_index() != 0:
            return {}
        return {"step": step, "trainable_bytes": self.run.summary.trainable_bytes,
                **sizes(os.path.join(self.directory, str(step)))}

    def _record(self, step: int, trainable, opt_state) -> dict:
        return {
            "format": FORMAT, "step": step, "method": self.run.method.name,
            "method_options": self.run.config.method.to_dict(),
            "config": json.loads(self.run.config.to_json_best_effort()),
            "base": self.base,
            "data": data_position(self.run.data["train"], self.run.config, step),
            "rng": {"dropout_key": self.dropout_key, "step_key": "fold_in(dropout_key, step)"},
            "shapes": {"trainable": shapes(trainable), "opt_state": shapes(opt_state)},
            "sha256": {"trainable": fingerprint(trainable), "opt_state": fingerprint(opt_state)},
            "trainable_bytes": self.run.summary.trainable_bytes,
        }

    def close(self):
        if self.manager:
            self.manager.close()


def describe(saved: dict) -> str:
    """One log line for what `Checkpoints.save` returns."""
    human = partition.human_bytes
    return (f"checkpoint step {saved['step']}: adapter {human(saved['adapter_bytes'])} (trainable "
            f"{human(saved['trainable_bytes'])} + metadata), with optimizer state {human(saved['checkpoint_bytes'])}")


def base_record(config, frozen) -> dict:
    """What a checkpoint records of its frozen base: where it comes from and the sha256 of `frozen`."""
    return {**base_identity(config), "sha256": fingerprint(frozen)}


def check_base(recorded: dict, current: dict, where: str, allow_mismatch: bool = False):
    """The frozen base a checkpoint was trained on (`recorded`, from its record) must be the one
    loaded now (`current`: `base_record` of the frozen subtree)."""
    if recorded["sha256"] == current["sha256"]:
        return
    if not allow_mismatch:
        raise UserError(f"the frozen base differs from the one checkpoint {where} was trained on "
                        f"(sha256 {recorded['sha256'][:12]}… of {_describe(recorded)}, now "
                        f"{current['sha256'][:12]}… of {_describe(current)}); load the same base, or set "
                        "config.checkpoint.allow_base_mismatch=True to resume anyway")
    print(f"warning: the frozen base differs from the one checkpoint {where} was trained on "
          "(allowed by config.checkpoint.allow_base_mismatch)", flush=True)


def _describe(base: dict) -> str:
    return base.get("checkpoint") or f"preset {base.get('preset')!r} (seed {base.get('seed')})"


def truncate_metrics(workdir: str, step: int):
    """Drop metrics.jsonl records past `step` (they belong to steps the resumed run repeats).

    Written to a temporary file and renamed, so a kill here leaves the old file whole.
    Only process 0 writes metrics."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    atomic.write_text(path, "".join(kept))


def load_adapter(workdir: str, which: str | int = "latest"):
    """(config, trainable subtree as numpy, record) of a run's checkpoint, for serving.

    `which` is "latest", "best" (by config.checkpoint.best_metric; needs keep_best > 0) or a
    step. Nothing heavy is built: no model, no base weights, no optimizer state. The
    trainable bytes are checked against the recorded sha256. The record holds the method,
    base identity and hash, and the step."""
    directory = os.path.join(workdir, DIRECTORY)
    if not os.path.isdir(directory):
        raise UserError(f"{workdir!r} has no checkpoints (no {DIRECTORY}/ directory); train there first")
    read_only = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    # Orbax logs "Given directory is read only" as a WARNING whenever a read_only manager opens, though
    # nothing is wrong: read_only is what serving asks for (it guarantees loading never writes, even
    # beside a training run), so keep it and drop exactly that record from Orbax's (absl's) logger.
    from absl import logging as absl_logging
    quiet = lambda record: not record.getMessage().startswith("Given directory is read only")
    absl_logging.get_absl_logger().addFilter(quiet)
    try:
        manager = _orbax_manager(directory, read_only)
    finally:
        absl_logging.get_absl_logger().removeFilter(quiet)
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{directory!r} holds no complete checkpoint; train there first")
    if which == "best":
        options = _read_record(manager, steps[-1], directory)["config"]["checkpoint"]
        ranked = {s: m[options["best_metric"]] for s in steps if (m := manager.metrics(s))}
        if not ranked:
            raise UserError(f"no checkpoint in {directory!r} has eval metrics (trained with "
                            "checkpoint.keep_best=0); use which='latest' or a step")
        step = (min if options["best_mode"] == "min" else max)(ranked, key=ranked.get)
    elif which == "latest":
        step = steps[-1]
    elif which in steps:
        step = which
    else:
        raise UserError(f"which={which!r}: choose 'latest', 'best' or one of the saved steps {list(steps)}")
    record = _read_record(manager, step, directory)
    trainable = _verified(manager, directory, step, "trainable", record)
    manager.close()
    return ml_collections.ConfigDict(record["config"]), trainable, record
