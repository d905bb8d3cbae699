"""docs/RESULTS.md from the converged study (issue 21, experiments/study_converged.py):

    python scripts/report_converged.py --workdir workdirs/converged --collect   # copy its records, then report
    python scripts/report_converged.py --workdir docs/study-converged           # again, from the repository

--workdir holds what the study's sweeps and benchmarks/peft_recipe.py wrote: <part>/<point>/config.json,
final_metrics.json and metrics.jsonl, <part>/results.jsonl, peft-<task>.jsonl. --collect first copies those
files (no checkpoints, no event files, no unfinished points) to <docs>/study-converged and reports from the
copy, so that the report regenerates from the repository alone. Every number is computed from the files; a
part or method not finished yet reads "not run yet", so the report can be regenerated while the study runs.

The low-budget study keeps its own file, docs/RESULTS_LOW_BUDGET.md (scripts/report.py), which RESULTS.md
links to under a heading of its own: embedding it would make this script regenerate that report as well
(its plots, and the data sets its majority-class and per-domain rows read), and two scripts would write
one file. The table and verdict helpers are scripts/report.py's, imported.
"""

import collections
import math
import os
import statistics
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (scripts/report.py)
from report import CLAIMS, CLOSE, mean, pm, read_json, std, table, values  # noqa: E402

from ptune import atomic, cli, config  # noqa: E402
from ptune.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = config.load_module(os.path.join(ROOT, "experiments", "study_converged.py"))
PEFT_METHODS = config.load_module(os.path.join(ROOT, "benchmarks", "peft_recipe.py")).METHODS
PEFT_TASKS = ["sentiment", "spam"]
TASKS = ["sentiment", *STUDY.TRANSFER_METHODS]
RECORDS = ("config.json", "final_metrics.json", "metrics.jsonl")   # of a point: all the report reads
NOT_RUN = "not run yet"


def define_flags():
    flags.DEFINE_string("workdir", None, "The converged study's directory (its parts' workdirs, peft-<task>.jsonl).")
    flags.DEFINE_string("docs", "docs", "Where RESULTS.md goes (and, with --collect, study-converged/).")
    flags.DEFINE_bool("collect", False, "Copy the records the report reads from --workdir to "
                      "<docs>/study-converged first, and report from that copy.")
    flags.mark_flags_as_required(["workdir"])


# ---- the plan and the records -----------------------------------------------------------------------

def parts() -> dict[str, dict[str, int]]:
    """{part directory: {method: points planned}} as experiments/study_converged.py's get_sweep plans them,
    counted here because get_sweep needs chosen rates that a partial study may not have yet."""
    out = {"select-sentiment": {m: len(rates) for m, rates in STUDY.GRID.items()},
           "seeds-sentiment": {m: len(STUDY.SEEDS) - 1 for m in STUDY.GRID}}
    out.update({f"transfer-{t}": {m: len(STUDY.SEEDS) for m in ms} for t, ms in STUDY.TRANSFER_METHODS.items()})
    out.update({f"kshot-{k}": {m: len(STUDY.SHOT_SEEDS) for m in STUDY.KSHOT_METHODS} for k in STUDY.K_SHOTS})
    return out


def peft_parts() -> dict[str, dict[str, int]]:
    return {f"peft-{t}": {m: len(STUDY.SEEDS) for m in PEFT_METHODS} for t in PEFT_TASKS}


def steps_per_epoch(task: str) -> int:
    """As get_config: the task's training examples (TASKS) over the batch, rounded up."""
    return math.ceil(STUDY.TASKS[task][2] / STUDY.BATCH)


def converged(best_step: int, stopped_step: int, eval_every: int, patience: int) -> bool:
    """Patience ran out: `patience` evaluations followed the best one. A run that reached its step cap
    with a later best (stopped_step is then the cap) was still improving."""
    return stopped_step - best_step >= patience * eval_every


def seconds_per_step(point_dir: str, batch: int) -> float | None:
    """The median over the logged training intervals of batch / examples_per_s (the first interval holds
    the compilation; the median leaves it out). A vmapped job logs its own rate for each of its points."""
    logged = read_json(os.path.join(point_dir, "metrics.jsonl"), lines=True, default=[])
    rates = [r["examples_per_s"] for r in logged if r["split"] == "train" and r.get("examples_per_s")]
    return statistics.median(batch / r for r in rates) if rates else None


def read_point(point_dir: str) -> dict | None:
    """A finished point's final metrics with what its config says (the method's name, not final_metrics'
    label such as 'full+head'), whether it converged and its seconds per step; None when unfinished."""
    final = read_json(os.path.join(point_dir, "final_metrics.json"))
    if final is None:
        return None
    c = read_json(os.path.join(point_dir, "config.json"))
    t = c["train"]
    return {**final, "label": final["method"], "method": c["method"]["name"], "lr": c["optim"]["learning_rate"],
            "seed": c["seed"], "task": c["task"]["name"], "dir": point_dir,
            "converged": converged(final["best_step"], final["stopped_step"], t["eval_every"], t["patience"]),
            "s_per_step": seconds_per_step(point_dir, t["batch_size"])}


def load(workdir: str) -> dict[str, list[dict]]:
    """{part: its finished points} and {peft-<task>: benchmarks/peft_recipe.py's rows}; a part not
    started is an empty list."""
    data = {}
    for part in parts():
        d = os.path.join(workdir, part)
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        data[part] = [r for r in (read_point(os.path.join(d, n)) for n in names) if r]
    for part in peft_parts():
        rows = read_json(os.path.join(workdir, f"{part}.jsonl"), lines=True, default=[])
        task = part.removeprefix("peft-")
        for r in rows:   # PEFT evaluates every epoch with the study's patience, as the ptune runs
            r["lr"] = r["learning_rate"]
            r["converged"] = converged(r["best_step"], r["stopped_step"], steps_per_epoch(task), STUDY.PATIENCE)
        data[part] = rows
    return data


def collect(workdir: str, records: str) -> str:
    """Copy what the report reads (RECORDS of every finished point, each part's results.jsonl and the
    peft-<task>.jsonl files) from `workdir` to `records`, file by file; returns `records`."""
    if os.path.abspath(workdir) == os.path.abspath(records):
        return records

    def copy(*path):
        src = os.path.join(workdir, *path)
        if os.path.exists(src):
            with open(src, encoding="utf-8") as f:
                atomic.write_text(os.path.join(records, *path), f.read())
    for part in parts():
        if not os.path.isdir(os.path.join(workdir, part)):
            continue
        copy(part, "results.jsonl")
        for name in sorted(os.listdir(os.path.join(workdir, part))):
            if os.path.exists(os.path.join(workdir, part, name, "final_metrics.json")):
                for record in RECORDS:
                    copy(part, name, record)
    for part in peft_parts():
        copy(f"{part}.jsonl")
    return records


# ---- measures ---------------------------------------------------------------------------------------

def chosen_rates(workdir: str) -> dict[str, float]:
    select = os.path.join(workdir, "select-sentiment")
    return STUDY.chosen_rates(select) if os.path.isdir(select) else {}


def grid_done(data, method: str) -> int:
    return len({r["lr"] for r in data["select-sentiment"] if r["method"] == method})


def edge(method: str, rate: float) -> str:
    """Whether the chosen rate is the grid's smallest or largest: the best rate may then lie outside."""
    grid = STUDY.GRID[method]
    if math.isclose(rate, grid[0]):
        return "yes, the smallest: the best may be lower"
    if math.isclose(rate, grid[-1]):
        return "yes, the largest: the best may be higher"
    return "no"


def accuracy_runs(data, rates, task: str, method: str) -> list[dict]:
    """The method's runs on `task` at its chosen rate, seeds 0-2: on sentiment seed 0 comes from the
    selection and seeds 1-2 from the seeds part; the other tasks' from their transfer part."""
    if method not in rates:
        return []
    rows = data["select-sentiment"] + data["seeds-sentiment"] if task == "sentiment" else \
        data.get(f"transfer-{task}", [])
    return sorted((r for r in rows if r["method"] == method and r["task"] == task and r["seed"] in STUDY.SEEDS
                   and math.isclose(r["lr"], rates[method])), key=lambda r: r["seed"])


def capped(rows) -> int:
    """How many runs hit the step cap still improving (not converged)."""
    return sum(not r["converged"] for r in rows)


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error from the two seed spreads."""
    return mean(a) - mean(b), (std(a) ** 2 / len(a) + std(b) ** 2 / len(b)) ** 0.5


def problem(data, rates, task: str, method: str) -> str | None:
    """What keeps the method's runs on `task` from a verdict: its selection unfinished, seeds missing, or a
    run that did not converge; None when all seeds ran to convergence."""
    if grid_done(data, method) < len(STUDY.GRID[method]):
        return f"{method}: learning-rate selection {grid_done(data, method)}/{len(STUDY.GRID[method])} rates run"
    rows = accuracy_runs(data, rates, task, method)
    if len(rows) < len(STUDY.SEEDS):
        return f"{method} {task}: {len(rows)}/{len(STUDY.SEEDS)} seeds run"
    if capped(rows):
        return f"{method} {task}: {capped(rows)} of {len(rows)} seeds not converged (hit the {STUDY.MAX_EPOCHS}-epoch cap)"
    return None


def method_gap(data, rates, method: str):
    """(report.gap of the method's test accuracy against full's over the tasks where both ran to
    convergence, those tasks, what is missing elsewhere, whether a finished run did not converge)."""
    groups, tasks, missing, unconverged = {}, [], [], False
    for task in [t for t in TASKS if t == "sentiment" or method in STUDY.TRANSFER_METHODS[t]]:
        problems = [p for p in (problem(data, rates, task, m) for m in dict.fromkeys((method, "full"))) if p]
        if problems:
            missing += problems
            unconverged |= any("not converged" in p for p in problems)
            continue
        tasks.append(task)
        for m in (method, "full"):
            groups[(m, task)] = accuracy_runs(data, rates, task, m)
    keys = [lambda m, t=t: (m, t) for t in tasks]
    missing = list(dict.fromkeys(missing))   # an unfinished selection is named once, not once per task
    return report.gap(groups, keys, method, metric="test_accuracy"), tasks, missing, unconverged


# ---- report -----------------------------------------------------------------------------------------

def fmt_rate(lr: float) -> str:
    return f"{lr:g}"


def acc(xs: list[float]) -> str:
    """'mean ± std (n)' in points; one value alone has no spread to show."""
    return f"{xs[0] * 100:.1f} (1)" if len(xs) == 1 else pm(xs, always_n=True)


def recipe() -> list[str]:
    c = STUDY.get_config("select:sentiment")
    o, t = c.optim, c.train
    text = (f"Model: MiniLM-L6 (`{c.model.checkpoint}`) with a fresh classification head, dropout as its config. "
            f"{o.optimizer} (weight decay {o.weight_decay:g}, b1 {o.b1:g}, b2 {o.b2:g}), one learning rate for every "
            f"trainable leaf (the head included), {o.warmup_steps} warmup steps then {o.schedule}, gradient clipping "
            f"at norm {o.clip_norm:g}, batch {t.batch_size}. Validation accuracy after every epoch; early stopping "
            f"after {t.patience} evaluations without improvement, at most {STUDY.MAX_EPOCHS} epochs; test accuracy "
            "of the best epoch's parameters. Each method's rate is chosen on sentiment validation accuracy (seed 0; "
            f"ties: the smaller) from its grid, then seeds {', '.join(map(str, STUDY.SEEDS[1:]))} run at it; the "
            "other tasks and the K-shot runs reuse sentiment's rate. The hybrid's prompt group trains at ten times "
            "its rate (the rate shown).")
    grid = table(["method", "learning-rate grid"], [[m, ", ".join(map(fmt_rate, r))] for m, r in STUDY.GRID.items()])
    rows = []
    for task, (options, length, examples) in STUDY.TASKS.items():
        tc = STUDY.get_config(f"select:{task}").train
        rows.append([task, examples, length, steps_per_epoch(task), tc.steps,
                     ", ".join(STUDY.TRANSFER_METHODS.get(task, [])) or "all"])
    tasks = table(["task", "training examples", "max length", "steps per epoch", "step cap", "methods"], rows)
    kshot = (f"K-shot: sentiment with K = {', '.join(map(str, STUDY.K_SHOTS))} examples per class, draws "
             f"{', '.join(map(str, STUDY.SHOT_SEEDS))} (each its own seed); evaluated every epoch but at least every "
             f"{STUDY.MIN_EVAL_STEPS} steps, at most {STUDY.MAX_EPOCHS} epochs but at least {STUDY.MIN_STEPS} steps.")
    return ["### Recipe", text, grid, tasks, kshot]


def coverage(data) -> str:
    """Per part: points planned, finished, and the methods still to run (with their counts)."""
    rows = []
    for part, plan in {**parts(), **peft_parts()}.items():
        done = collections.Counter(r["method"] for r in data[part])
        todo = {m: n - done[m] for m, n in plan.items() if done[m] < n}
        finished = sum(min(done[m], n) for m, n in plan.items())
        rows.append([part, sum(plan.values()), finished,
                     ", ".join(f"{m} ({n})" for m, n in todo.items()) or "–"])
    return table(["part", "planned points", "finished", NOT_RUN + " (points)"], rows)


def selection(data, rates) -> list[str]:
    rows = []
    for m in STUDY.GRID:
        runs = [r for r in data["select-sentiment"] if r["method"] == m]
        cells = []
        for lr in STUDY.GRID[m]:
            run = next((r for r in runs if math.isclose(r["lr"], lr)), None)
            cells.append(f"{fmt_rate(lr)}: " + (NOT_RUN if run is None else f"{run['validation_accuracy'] * 100:.1f}"
                                                + ("" if run["converged"] else " (cap: not converged)")))
        done = grid_done(data, m)
        if m not in rates:
            chosen, at_edge = NOT_RUN, "–"
        elif done < len(STUDY.GRID[m]):
            chosen, at_edge = f"{fmt_rate(rates[m])} (provisional: {done}/{len(STUDY.GRID[m])} rates run)", "–"
        else:
            chosen, at_edge = fmt_rate(rates[m]), edge(m, rates[m])
        rows.append([m, *cells, chosen, at_edge])
    return ["## Learning-rate selection (sentiment)",
            "Validation accuracy (%) of seed 0 at each rate of the method's grid; the best wins (ties: the smaller "
            "rate; `experiments/study_converged.py:chosen_rates`). A rate at the grid's edge may not be the best.",
            table(["method", "rate 1", "rate 2", "rate 3", "chosen", "at the grid's edge"], rows)]


def accuracy_row(data, rates, task: str, method: str) -> list:
    rows = accuracy_runs(data, rates, task, method)
    if not rows:
        return [method, fmt_rate(rates[method]) if method in rates else "–", NOT_RUN, *["" for _ in range(6)]]
    spe, n, cap = steps_per_epoch(task), len(rows), capped(rows)
    stop = f"early {n}/{n}" if not cap else f"**{cap}/{n} hit the cap: not converged**"
    timed = [r for r in rows if r["s_per_step"]]
    return [method, fmt_rate(rates[method]), acc(values(rows, "test_accuracy")),
            f"{rows[0]['trainable_params']:,}", f"{rows[0]['trainable_percent']:.3g}",
            ", ".join(f"{r['best_step'] / spe:g}" for r in rows), stop,
            f"{mean([r['s_per_step'] for r in timed]):.3f}" if timed else "–",
            f"{mean([r['best_step'] * r['s_per_step'] for r in timed]):.0f}" if timed else "–"]


def accuracy(data, rates) -> list[str]:
    out = ["## Accuracy",
           "Test accuracy (%) mean ± std over seeds 0-2 (n) at the rate chosen on sentiment; epochs to best = "
           "best_step / steps per epoch, per seed; stopped = early stopping ran out of patience, or the run hit "
           f"the {STUDY.MAX_EPOCHS}-epoch cap still improving (not converged). s/step = the median over a run's "
           "logged training intervals of batch / examples_per_s, averaged over the seeds; time to best = best_step "
           "× s/step. The points of one method and part train as one vmapped job whose rate each of its points "
           "records: s/step is that job's, for all its points at once (3 rates in the selection, 2 seeds in the "
           "seeds part, 3 in a transfer part), not a lone run's. CPU as recorded in BUILD_NOTES (the runs do not "
           "record it), shared with other work."]
    header = ["method", "rate", "test accuracy", "trainable", "%", "epochs to best", "stopped", "s/step",
              "time to best s"]
    for task in TASKS:
        methods = list(STUDY.GRID) if task == "sentiment" else STUDY.TRANSFER_METHODS[task]
        out += [f"### {task}", table(header, [accuracy_row(data, rates, task, m) for m in methods])]
    return out


def peft_row(data, rates, task: str, method: str) -> list:
    ours = {r["seed"]: r for r in accuracy_runs(data, rates, task, method)}
    theirs = {r["seed"]: r for r in data[f"peft-{task}"] if r["method"] == method}
    seeds = sorted(ours.keys() & theirs.keys())
    if not seeds:
        return [method, fmt_rate(rates[method]) if method in rates else "–",
                *[acc(values(side.values(), "test_accuracy")) if side else NOT_RUN
                  for side in (ours, theirs)], "", "", "", ""]
    a, b = [ours[s]["test_accuracy"] for s in seeds], [theirs[s]["test_accuracy"] for s in seeds]
    diff, se = difference(a, b)
    rate = fmt_rate(rates[method]) + ("" if all(math.isclose(theirs[s]["lr"], rates[method]) for s in seeds)
                                      else " (PEFT at another rate!)")
    cap = capped([ours[s] for s in seeds]) + capped([theirs[s] for s in seeds])
    return [method, rate, acc(a), acc(b), f"{diff * 100:+.1f} ± {se * 100:.1f}",
            "yes" if abs(diff) <= max(CLOSE, 2 * se) else "no",
            f"{ours[seeds[0]]['trainable_params']:,} / {theirs[seeds[0]]['trainable_params']:,}",
            f"{cap} not converged" if cap else "all early"]


def versus_peft(data, rates) -> list[str]:
    out = ["## ptune vs HF PEFT",
           "benchmarks/peft_recipe.py runs the same recipe with PEFT + transformers on PyTorch: the same encoded "
           "examples in ptune's batch order per seed, the rate ptune's selection chose, the same early stopping. "
           "Test accuracy (%) mean ± std over the seeds both ran (n); difference = ptune − PEFT ± its standard "
           f"error from the seed spreads; same = within {CLOSE * 100:.0f} point or two standard errors. PEFT has no "
           "prefix tuning for BERT under transformers 5 (benchmarks/peft_recipe.py)."]
    header = ["method", "rate", "ptune", "PEFT", "difference (points)", "same", "trainable ptune / PEFT", "stopped"]
    for task in PEFT_TASKS:
        out += [f"### {task}", table(header, [peft_row(data, rates, task, m) for m in PEFT_METHODS])]
    return out


def kshot(data, rates) -> list[str]:
    def cell(rows):
        if not rows:
            return NOT_RUN
        return acc(values(rows, "test_accuracy")) + (f", {capped(rows)} not converged" if capped(rows)
                                                                   else "")
    rows = [[m, *[cell([r for r in data[f"kshot-{k}"] if r["method"] == m]) for k in STUDY.K_SHOTS],
             cell(accuracy_runs(data, rates, "sentiment", m))] for m in STUDY.KSHOT_METHODS]
    examples = STUDY.TASKS["sentiment"][2]
    return ["## K-shot (sentiment)",
            f"Test accuracy (%) mean ± std over the {len(STUDY.SHOT_SEEDS)} K-shot draws (n), K examples per class "
            f"at sentiment's chosen rate; 'all' = the {examples:,}-example training set over seeds 0-2 (Accuracy).",
            table(["method", *[f"K={k}" for k in STUDY.K_SHOTS], f"all ({examples:,})"], rows)]


def gap_verdict(data, rates, method: str, judge, rule: str) -> tuple[str, str, str]:
    """(claim, verdict, evidence) for a claim about the method's gap to full fine-tuning; 'open' while
    sentiment's runs are missing or a finished run did not converge."""
    gap, tasks, missing, unconverged = method_gap(data, rates, method)
    if unconverged or "sentiment" not in tasks:
        return CLAIMS[method], "open: " + "; ".join(missing), "–"
    word = {True: "agrees", False: "does not agree"}.get(judge([gap]), judge([gap]))
    edges = [m for m in dict.fromkeys((method, "full")) if edge(m, rates[m]) != "no"]
    if missing or edges:   # a reading of the runs so far, which the missing tasks or a wider grid may change
        word += " (provisional)"
    evidence = (f"{method} − full {gap[0] * 100:+.1f} ± {gap[1] * 100:.1f} points, test accuracy over "
                f"{', '.join(tasks)}; {rule}" + (f"; not yet: {'; '.join(missing)}" if missing else "")
                + (f"; chosen rate at the grid's edge: {', '.join(edges)}" if edges else ""))
    return CLAIMS[method], word, evidence


def hybrid_verdict(data, rates) -> tuple[str, str, str]:
    parts_ = ("lora", "prompt", "lora+prompt")
    missing = [p for p in (problem(data, rates, "sentiment", m) for m in parts_) if p]
    if missing:
        return CLAIMS["hybrid"], "open: " + "; ".join(missing), "–"
    accs = {m: mean(values(accuracy_runs(data, rates, "sentiment", m), "test_accuracy")) for m in parts_}
    return (CLAIMS["hybrid"], "agrees" if report.hybrid_holds(accs) else "does not agree",
            "sentiment test: " + ", ".join(f"{m} {accs[m] * 100:.1f}" for m in parts_)
            + f"; agrees if the hybrid is within {CLOSE * 100:.0f} point of its better part or above it")


def verdicts(data, rates) -> list[str]:
    near = (f"agrees if no more than {CLOSE * 100:.0f} point below (two standard errors below that: does not "
            "agree; between: inconclusive)")
    short = f"agrees if more than {CLOSE * 100:.0f} point below by two standard errors"
    rows = [gap_verdict(data, rates, m, report.near_full, near) for m in ("lora", "bitfit", "adapter", "prefix")]
    rows += [gap_verdict(data, rates, "prompt", report.falls_short, short), hybrid_verdict(data, rates)]
    rows += [(CLAIMS[c], "open: not measured in the converged study (SmolLM2; see the low-budget runs)", "–")
             for c in ("forgetting", "manual")]
    full = [r["trainable_params"] for r in data["select-sentiment"] if r["method"] == "full"]
    size = f"{full[0] / 1e6:.1f}M parameters, " if full else ""
    regime = (f"Regime: MiniLM-L6 ({size}an encoder with a fresh head) on small classification tasks; "
              f"every run trained until validation accuracy stopped improving ({STUDY.PATIENCE} evaluations, one "
              f"per epoch, at most {STUDY.MAX_EPOCHS} epochs); each method's learning rate chosen on sentiment "
              f"validation from a {len(STUDY.GRID['full'])}-rate grid; test accuracy, mean over seeds "
              f"{', '.join(map(str, STUDY.SEEDS))}; gap = method − full fine-tuning averaged over the tasks named, "
              "± its standard error from the seeds' spread. The papers' models and budgets were larger: each verdict "
              "speaks for this regime. A verdict whose runs are missing or not converged is open.")
    return ["## The literature's claims against the converged runs", regime,
            table(["claim", "verdict", "measured"], rows)]


def low_budget() -> list[str]:
    enc, dec = report.STUDY.get_config("encoder").train, report.STUDY.get_config("decoder").train
    return ["## Earlier low-budget runs (not converged)",
            f"The first study (experiments/study.py) trained MiniLM-L6 for {enc.steps} steps of batch "
            f"{enc.batch_size} and SmolLM2-135M for {dec.steps} steps of batch {dec.batch_size}, with one learning "
            "rate per method and no run to convergence. Its tables, plots and verdicts (cost, forgetting, "
            "fragility, multi-task serving, data efficiency, generation) are in "
            "[RESULTS_LOW_BUDGET.md](RESULTS_LOW_BUDGET.md), generated by scripts/report.py from docs/study-runs/; "
            "where the two disagree on accuracy, the converged runs above speak for a converged budget."]


def render(data, workdir: str, shown: str | None = None) -> str:
    """RESULTS.md's text; `shown`: the workdir as the regenerating command names it."""
    rates = chosen_rates(workdir)
    intro = (f"Generated by `python scripts/report_converged.py --workdir {shown or workdir}` from the records of the "
             "converged study (experiments/study_converged.py, benchmarks/peft_recipe.py); do not edit by hand. "
             "Parts or methods still running read \"not run yet\".")
    blocks = ["# Results: fine-tuning vs prompt-tuning, trained to convergence", intro, *verdicts(data, rates),
              "## What ran", *recipe(), "### Points finished", coverage(data), *selection(data, rates),
              *accuracy(data, rates), *versus_peft(data, rates), *kshot(data, rates), *low_budget()]
    return "\n\n".join(blocks) + "\n"


def main():
    F = flags.FLAGS
    if not os.path.isdir(F.workdir):
        raise UserError(f"--workdir {F.workdir} is not a directory; give the converged study's (its parts' "
                        "workdirs, e.g. select-sentiment/)")
    workdir = collect(F.workdir, os.path.join(F.docs, "study-converged")) if F.collect else F.workdir
    data = load(workdir)
    if not any(data.values()):
        raise UserError(f"{workdir} holds no finished point of the converged study (e.g. select-sentiment/<point>/"
                        "final_metrics.json); run its sweeps first (experiments/study_converged.py)")
    shown = os.path.relpath(workdir, ROOT) if os.path.abspath(workdir).startswith(ROOT + os.sep) else workdir
    path = os.path.join(F.docs, "RESULTS.md")
    atomic.write_text(path, render(data, workdir, shown))
    print(f"wrote {path} from {workdir}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
