"""Run the whole fine-tuning vs prompt-tuning study (experiments/study.py) and write its report:

    python scripts/study.py --workdir workdirs/study

Stages, each skipped when its results exist (so an interrupted study continues):
  encoder, decoder, data, generate   the sweeps of experiments/study.py (vmapped over seeds)
  cost        per model and method, one fresh process: step time, first-step (compile) time, the
              job's wall time, peak resident memory, and the adapter and checkpoint bytes on disk.
              MiniLM's runs are its whole recipe on the whole training set, the same job as
              updating a task when new data arrives (the maintenance measurement); SmolLM2's
              are COST_STEPS["decoder"] steps, for CPU time
  multitask   the encoder's four tasks as LoRA adapters in one bank vs one full model per task:
              storage, swap time, mixed-batch throughput
  report      copies the runs' records (no checkpoints, no event files) to --records, then
              scripts/report.py writes tables, plots and docs/RESULTS_LOW_BUDGET.md from them
--stages picks some of them (comma-separated).
"""

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

from ptune import cli
from ptune.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("encoder", "decoder", "data", "generate", "cost", "multitask", "report")   # the first four: sweeps
FIRST_STEPS = 2   # reported apart (compilation); the median step time is over the others
COST_STEPS = {"encoder": None, "decoder": 8}   # None: the part's recipe

flags.DEFINE_string("workdir", None, "The study's directory (one sub-directory per stage).")
flags.DEFINE_string("stages", ",".join(STAGES), f"Stages to run, of {STAGES}.")
flags.DEFINE_string("measure", "", "Internal: 'part:method' runs one cost measurement in --workdir (cost stage).")
flags.DEFINE_string("docs", os.path.join(ROOT, "docs"), "Where the report writes RESULTS_LOW_BUDGET.md and its plots.")
flags.DEFINE_string("records", os.path.join(ROOT, "docs", "study-runs"),
                    "Where the report stage keeps the runs' records (metrics, predictions, configs) it reads.")
flags.mark_flags_as_required(["workdir"])


@functools.cache
def study():
    """experiments/study.py as a module (its METHODS, tasks and get_config), loaded once."""
    from ptune import config
    return config.load_module(os.path.join(ROOT, "experiments", "study.py"))


def run_sweep(part: str, workdir: str):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"),
                    f"--config={os.path.join(ROOT, 'experiments', 'study.py')}:{part}",
                    f"--workdir={os.path.join(workdir, part)}", "--vmap", f"--vmap_chunk={study().VMAP_CHUNK[part]}"],
                   check=True)


def measure(spec: str, workdir: str):
    """Child process of the cost stage: one method trained COST_STEPS[part] steps (the recipe's
    when None), logging every step, with the adapter saved and the validation split evaluated once
    at the end."""
    from ptune import config
    from ptune.training import train
    part, method = spec.split(":")
    s = study()
    steps = COST_STEPS[part] or s.get_config(part).train.steps
    overrides = {"method": method, **s.METHODS[method], "train.steps": steps, "train.log_every": 1,
                 "train.eval_every": steps, "checkpoint.every_steps": steps, "eval.splits": "",
                 "eval.templates": False, "eval.predictions": False, "eval.lm_task": ""}
    train.train_and_evaluate(config.override(s.get_config(part), overrides, f"cost {spec}"), workdir)


def cost(workdir: str):
    """One process per (part, method): peak RSS from os.wait4 (per child, not the max of all), wall
    time from start to exit (imports, model load, training, evaluation, the checkpoint). cost.json
    is rewritten after every measurement and measured pairs are skipped, so the stage resumes."""
    from ptune.training import checkpoint
    path = os.path.join(workdir, "cost.json")
    rows = read_json(path) if os.path.exists(path) else []
    for part, methods in (("encoder", study().METHODS), ("decoder", study().DECODER_METHODS)):
        batch = study().get_config(part).train.batch_size
        for method in methods:
            if any((r["part"], r["method"]) == (part, method) for r in rows):
                continue
            where = os.path.join(workdir, "cost", part, method.replace("+", "_"))
            shutil.rmtree(where, ignore_errors=True)
            t0 = time.perf_counter()
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--measure={part}:{method}",
                                      f"--workdir={where}"], stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            wall_s = time.perf_counter() - t0
            if status:
                raise RuntimeError(f"cost measurement {part}:{method} failed (status {status}); rerun "
                                   f"scripts/study.py --measure={part}:{method} --workdir=/tmp/x to see why")
            logs = read_json(os.path.join(where, "metrics.jsonl"), lines=True)
            step_s = [batch / r["examples_per_s"] for r in logs if r["split"] == "train"]
            final = read_json(os.path.join(where, "final_metrics.json"))
            saved = os.path.join(where, checkpoint.DIRECTORY, str(len(step_s)))
            rows.append({"part": part, "method": method, "trainable_params": final["trainable_params"],
                         "steps": len(step_s), "first_steps_s": sum(step_s[:FIRST_STEPS]),
                         "step_s": statistics.median(step_s[FIRST_STEPS:]), "train_s": sum(step_s),
                         "wall_s": wall_s, "peak_rss_bytes": usage.ru_maxrss * 1024, **checkpoint.sizes(saved)})
            print(json.dumps(rows[-1]), flush=True)
            _write_json(path, rows)


def multitask(workdir: str):
    """The encoder tasks' LoRA (+head) adapters in one bank on one MiniLM base, against one fully
    fine-tuned model per task. Costs do not depend on the trained values, so the adapters are
    freshly initialised ones of the trained shapes (LoRA B nonzero so no work is skipped)."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from ptune import config, partition
    from ptune.inference import bank
    from ptune.training import builder, train
    s = study()
    runs = {task: builder.setup(config.override(s.get_config("encoder"), {
        "method": "lora", "task.name": task, "task.options": options, "task.max_length": 64}, task))
        for task, (options, *_) in s.ENCODER_TASKS.items()}
    rng = np.random.default_rng(0)
    adapters = {}
    for task, run in runs.items():
        adapter = bank.TaskAdapter.from_trained(run.method, run.model, run.params)
        adapters[task] = bank.TaskAdapter(adapter.sites, jax.tree.map(
            lambda x: 0.02 * rng.standard_normal(x.shape).astype(np.float32), adapter.params))
    first = next(iter(runs.values()))
    _, frozen = partition.split(first.params, first.labels)
    the_bank = bank.Bank(first.model.config, frozen, adapters, capacity=8)
    rows_per_task = 8
    ids = np.concatenate([r.data["validation"]["input_ids"][:rows_per_task] for r in runs.values()])
    mask = np.concatenate([r.data["validation"]["attention_mask"][:rows_per_task] for r in runs.values()])
    names = list(runs)
    mixed = [names[i % len(names)] for i in range(len(ids))]          # neighbours differ
    single = [names[0]] * len(ids)
    own = jax.jit(lambda params, batch: train.objectives.class_logits(first.model, params, batch, "head"))
    own_batch = {"input_ids": ids, "attention_mask": mask}
    timings = {
        "swap_s": _median_s(lambda: the_bank.put(names[0], adapters[names[0]]) or the_bank.stacked, 20),
        "mixed_batch_s": _median_s(lambda: the_bank.classify(ids, mask, mixed), 10),
        "single_task_bank_s": _median_s(lambda: the_bank.classify(ids, mask, single), 10),
        "own_model_s": _median_s(lambda: own(first.params, own_batch), 10),
    }
    full_bytes = first.summary.total * 4
    with tempfile.TemporaryDirectory() as tmp:   # a full model per task: swapping = reading it
        path = os.path.join(tmp, "model.safetensors")
        save_file({k.replace("/", "."): np.asarray(v) for k, v in partition.flatten(first.params).items()}, path)
        timings["full_model_load_s"] = _median_s(lambda: load_file(path), 3)
    row = {"tasks": names, "batch": len(ids), **timings,
           "adapter_bytes": {t: int(sum(x.nbytes for x in jax.tree.leaves(a.params))) for t, a in adapters.items()},
           "base_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(frozen))),
           "full_model_bytes": int(full_bytes)}
    print(json.dumps(row), flush=True)
    _write_json(os.path.join(workdir, "multitask.json"), row)


def keep_records(workdir: str, records: str):
    """The study's records without what the report does not read (checkpoints, TensorBoard
    events, the cost runs' workdirs: cost.json holds their numbers, unfinished points: a rerun
    starts them afresh), replacing `records` whole."""
    if os.path.abspath(workdir) == os.path.abspath(records):
        return

    def unread(directory, names):
        def unfinished(name):
            point = os.path.join(directory, name)
            return os.path.exists(os.path.join(point, "config.json")) and not \
                os.path.exists(os.path.join(point, "final_metrics.json"))
        return {n for n in names if n in ("checkpoints", "cost") or n.startswith("events.out.tfevents.")
                or unfinished(n)}
    shutil.rmtree(records + ".tmp", ignore_errors=True)
    shutil.copytree(workdir, records + ".tmp", ignore=unread)
    shutil.rmtree(records, ignore_errors=True)
    os.replace(records + ".tmp", records)


def _median_s(fn, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn())   # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_json(path: str, lines: bool = False):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)


def _write_json(path: str, value):
    from ptune import atomic
    atomic.write_text(path, json.dumps(value, indent=1))


def main():
    F = flags.FLAGS
    if F.measure:
        return measure(F.measure, F.workdir)
    stages = [s for s in F.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    os.makedirs(F.workdir, exist_ok=True)
    for stage in stages:
        print(f"== {stage}", flush=True)
        if stage in study().PARTS:
            run_sweep(stage, F.workdir)
        elif stage == "report":
            keep_records(F.workdir, F.records)
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report.py"), f"--workdir={F.records}",
                            f"--docs={F.docs}"], check=True)
        elif stage == "cost":
            cost(F.workdir)
        elif not os.path.exists(os.path.join(F.workdir, "multitask.json")):
            multitask(F.workdir)


if __name__ == "__main__":
    cli.run(main)
