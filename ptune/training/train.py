"""`train_and_evaluate(config, workdir)`: build the run, own its workdir, train only the trainable
subtree (resuming from the newest checkpoint), stop early or on a signal, evaluate.

Everything that can be wrong with a config is found by `builder.setup` before the workdir is
touched, so a bad run writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time

import jax

from ptune import partition, sharding
from ptune.errors import UserError
from ptune.training import builder, checkpoint, compute, objectives, stopping
from ptune.training import workdir as workdir_lib
from ptune.training.builder import Run
from ptune.training.compute import Layout


def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint if it has one; returns the
    final metrics (also in final_metrics.json). The run owns the workdir while it runs (a second
    run on it is refused, see ptune.training.workdir); a finished run's workdir is left as it is, unless
    more steps are asked for, which resume from its last checkpoint."""
    run = builder.setup(config)
    workdir_lib.prepare(workdir, checkpoint.space_needed(run))
    with workdir_lib.owned(workdir):
        # Opening validates and reads the newest checkpoint: a run that cannot resume (another method,
        # shape, base or data order) stops here, before anything in the workdir changes.
        checkpoints = (checkpoint.Checkpoints(workdir, run, compute.dropout_key(config.seed))
                       if run.method.trains else None)
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
            raise UserError(f"{workdir} holds a finished run of {done['steps']} steps but no checkpoint to train "
                            "further from (config.checkpoint.every_steps=0); choose another --workdir")
        # Records a killed run logged past its checkpoint (all, when it starts afresh) go before the
        # writer opens metrics.jsonl: the file is replaced, and records written to the old one would be lost.
        checkpoint.truncate_metrics(workdir, start_step if start_step else -1)
        return _run(run, workdir, checkpoints)


def _run(run: Run, workdir: str, checkpoints: checkpoint.Checkpoints | None) -> dict:
    writer, final = workdir_lib.start(run, workdir)
    if checkpoints and checkpoints.manager and writer.active:
        print(f"base sha256 {checkpoints.base['sha256'][:16]} ({checkpoints.base_hash_seconds:.2f} s)", flush=True)
        if checkpoints.start_step:
            print(f"resuming from step {checkpoints.start_step} of {checkpoints.directory}", flush=True)
    trainable, frozen = partition.split(run.params, run.labels)
    where = compute.layout(run, trainable, frozen)
    trainable, frozen = sharding.put(trainable, where.trainable), sharding.put(frozen, where.frozen)
    eval_step = compute.make_eval_step(run, where)
    if run.method.trains:
        with stop_on_signals() as stop_requested:
            metrics, trainable = _train(run, trainable, frozen, where, eval_step, writer, final, checkpoints,
                                        stop_requested)
        checkpoints.close()
    else:
        metrics = compute.evaluate(run, partition.merge(trainable, frozen), run.config.train.eval_split, eval_step,
                                   where)
        writer.write(0, run.config.train.eval_split, metrics)
    return workdir_lib.finish(run, writer, final, workdir, metrics, partition.merge(trainable, frozen), where)


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
    raise UserError(f"training step {bad + 1}: the loss or gradients are not finite, so the step was not applied "
                    f"and the run stopped ({kept}); lower config.optim.learning_rate or set config.optim.clip_norm, "
                    "or set config.train.nonfinite='skip' to leave such steps out")


def _train(run: Run, trainable, frozen, where: Layout, eval_step, writer: workdir_lib.MetricWriter, final: dict,
           checkpoints: checkpoint.Checkpoints, stop_requested=lambda: None) -> dict:
    """Steps from the newest checkpoint (or 0) to train.steps, evaluating every `eval_every` steps and
    after the last, saving when due; returns the last evaluation's metrics and the trained subtree
    (with train.patience: the best evaluation's, and training stops when patience runs out, see
    ptune.training.stopping). A non-finite step stops the run before anything later is saved
    (config.train.nonfinite='stop') or is skipped and counted in the train records' `skipped_steps`
    ('skip'); `stop_requested()` (the number of a signal, see stop_on_signals) saves the step reached
    and raises `Preempted`."""
    from tqdm import tqdm
    tc = run.config.train
    first, trainable, opt_state = checkpoints.resume(trainable, compute.init_opt_state(run, where, trainable), where)
    best = resumed_best(run, checkpoints, trainable, where) if tc.patience else None
    pending = []   # (step, device flag: not finite) since the last check
    step_fn = compute.make_step_fn(run, where, frozen, pending)
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
            evaluated = now = compute.evaluate(run, partition.merge(trainable, frozen), tc.eval_split, eval_step, where)
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
        evaluated = compute.evaluate(run, partition.merge(trainable, frozen), tc.eval_split, eval_step, where)
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
