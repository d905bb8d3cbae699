"""scripts/report_converged.py computes the converged study's tables and verdicts from records in the
format its sweeps and benchmarks/peft_recipe.py write (built here with numbers whose summaries are
known), and reads "not run yet" where a part or method has not finished."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import report_converged as rc  # noqa: E402  (scripts/report_converged.py)

from ptune.training import sweep  # noqa: E402

STUDY = rc.STUDY
PARAMS = {"full": (22713986, 100.0), "lora": (74498, 0.33), "prompt": (8450, 0.037), "lora+prompt": (82178, 0.36),
          "bitfit": (26114, 0.11)}


def point(workdir, part, method, lr, seed, *, val=0.9, test=0.9, best=3, stop=None, ex_s=8.0):
    """One finished point as a sweep writes it (config.json, final_metrics.json, metrics.jsonl) and its
    results.jsonl row. best/stop in epochs; stop None: patience ran out PATIENCE epochs after the best;
    ex_s: the logged examples/s after the first (compiling) interval."""
    kind, arg = part.split("-", 1)
    overrides = {"method": method, "optim.learning_rate": lr, "seed": seed}
    if kind == "kshot":
        overrides["task.options"] = {"domain": "all", "k_shot": int(arg), "shot_seed": seed}
    p = sweep.points(STUDY.get_config(f"kshot:{arg}" if kind == "kshot" else
                                      f"select:{'sentiment' if kind in ('select', 'seeds') else arg}"), [overrides])[0]
    t = p.config.train
    best_step = best * t.eval_every
    stopped = min((best + STUDY.PATIENCE if stop is None else stop) * t.eval_every, t.steps)
    d = workdir / part / p.name
    d.mkdir(parents=True)
    (d / "config.json").write_text(p.config.to_json_best_effort(indent=2))
    logged = [{"step": s, "split": "train", "loss": 0.2, "grad_norm": 1.0, "count": t.log_every * t.batch_size,
               "skipped_steps": 0, "examples_per_s": ex_s / 4 if s == t.log_every else ex_s}
              for s in range(t.log_every, stopped + 1, t.log_every)]
    logged += [{"step": s, "split": "validation", "loss": 0.3, "accuracy": val if s == best_step else val - 0.01,
                "count": 300} for s in range(t.eval_every, stopped + 1, t.eval_every)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(logged, key=lambda r: r["step"])))
    params, percent = PARAMS[method]
    final = {"method": f"{method}+head", "steps": t.steps, "trainable_params": params, "trainable_percent": percent,
             "train_loss": 0.1, "best_step": best_step, "stopped_step": stopped, "validation_loss": 0.3,
             "validation_accuracy": val, "validation_count": 300, "test_accuracy": test}
    (d / "final_metrics.json").write_text(json.dumps(final, indent=2))
    with open(workdir / part / "results.jsonl", "a") as f:
        f.write(json.dumps({"point": p.name, **overrides, **final}) + "\n")
    return d


def sentiment(workdir, method, tests, *, rate=None, vals=None, **kw):
    """The method's selection (seed 0 at each grid rate; `rate` wins, default the middle one) and seeds 1-2
    at it; `tests`: seeds 0-2's test accuracy."""
    grid = STUDY.GRID[method]
    rate = rate or grid[1]
    for lr in grid:
        val = (vals or {}).get(lr, 0.9 if lr == rate else 0.8)
        point(workdir, "select-sentiment", method, lr, 0, val=val, test=tests[0] if lr == rate else 0.5, **kw)
    for seed, test in zip((1, 2), tests[1:]):
        point(workdir, "seeds-sentiment", method, rate, seed, test=test, **kw)
    return rate


def peft(workdir, task, method, lr, tests, **row):
    with open(workdir / f"peft-{task}.jsonl", "a") as f:
        for seed, test in enumerate(tests):
            f.write(json.dumps({"task": task, "method": method, "seed": seed, "learning_rate": lr,
                                "validation_accuracy": 0.9, "test_accuracy": test, "best_step": 450,
                                "stopped_step": 750, "train_seconds": 100.0,
                                "trainable_params": PARAMS[method][0], **row}) + "\n")


def view(workdir):
    data = rc.load(str(workdir))
    return data, rc.chosen_rates(str(workdir))


def test_selection_chooses_by_validation_and_flags_the_grid_edge(tmp_path):
    sentiment(tmp_path, "full", [0.9] * 3, rate=1e-4)   # the largest of full's grid
    sentiment(tmp_path, "lora", [0.9] * 3)
    grid = STUDY.GRID["prompt"]   # a tie between the two larger rates: the smaller of them wins
    sentiment(tmp_path, "prompt", [0.9] * 3, rate=grid[1], vals={grid[0]: 0.8, grid[1]: 0.9, grid[2]: 0.9})
    data, rates = view(tmp_path)
    assert rates == {"full": 1e-4, "lora": STUDY.GRID["lora"][1], "prompt": grid[1]}   # method names, not labels
    assert rc.edge("full", rates["full"]).startswith("yes, the largest")
    assert rc.edge("full", 2e-5).startswith("yes, the smallest") and rc.edge("lora", rates["lora"]) == "no"
    rows = {c[0]: c for c in (line.strip("| ").split(" | ") for line in rc.selection(data, rates)[2].splitlines()[2:])}
    assert rows["full"][3:] == ["0.0001: 90.0", "0.0001", "yes, the largest: the best may be higher"]
    assert rows["bitfit"][1:] == ["0.001: not run yet", "0.003: not run yet", "0.01: not run yet", "not run yet", "–"]


def test_a_partial_grid_gives_a_provisional_rate(tmp_path):
    point(tmp_path, "select-sentiment", "lora", 5e-4, 0, val=0.9)
    data, rates = view(tmp_path)
    row = rc.selection(data, rates)[2].splitlines()[4]
    assert "0.0005 (provisional: 1/3 rates run)" in row and "0.0002: not run yet" in row


def test_convergence_from_best_and_stopped_steps():
    assert rc.converged(600, 900, 150, 2)        # patience ran out two epochs after the best
    assert rc.converged(1200, 1500, 150, 2)      # ... exactly at the cap
    assert not rc.converged(1350, 1500, 150, 2)  # at the cap with the best one epoch before: still improving
    assert not rc.converged(1500, 1500, 150, 2)


def test_accuracy_mean_std_epochs_and_time_to_best(tmp_path):
    for seed, (test, best) in enumerate([(0.90, 4), (0.92, 5), (0.94, 3)]):
        part = "select-sentiment" if seed == 0 else "seeds-sentiment"
        point(tmp_path, part, "full", 5e-5, seed, test=test, best=best, val=0.95 if seed == 0 else 0.9, ex_s=8.0)
    data, rates = view(tmp_path)
    row = rc.accuracy_row(data, rates, "sentiment", "full")
    # 16 / 8 examples/s = 2 s/step (the first, compiling interval left out by the median); epochs = best_step / 150
    assert row == ["full", "5e-05", "92.0 ± 2.0 (3)", "22,713,986", "100", "4, 5, 3", "early 3/3", "2.000",
                   f"{(600 + 750 + 450) * 2 / 3:.0f}"]
    assert rc.accuracy_row(data, rates, "spam", "full")[2:3] == ["not run yet"]
    assert rc.accuracy_row(data, rates, "sentiment", "lora")[1:3] == ["–", "not run yet"]


def test_a_run_at_the_cap_is_marked_not_converged(tmp_path):
    sentiment(tmp_path, "full", [0.9, 0.9, 0.9], best=8)              # patience runs out at the cap: converged
    sentiment(tmp_path, "lora", [0.9, 0.9, 0.9], best=9, stop=10)     # still improving at the cap
    data, rates = view(tmp_path)
    assert rc.accuracy_row(data, rates, "sentiment", "full")[6] == "early 3/3"
    assert rc.accuracy_row(data, rates, "sentiment", "lora")[6] == "**3/3 hit the cap: not converged**"
    claim, verdict, _ = rc.gap_verdict(data, rates, "lora", rc.report.near_full, "")
    assert verdict.startswith("open: lora sentiment: 3 of 3 seeds not converged")


def test_ptune_vs_peft_difference_with_its_noise(tmp_path):
    rate = sentiment(tmp_path, "lora", [0.90, 0.92, 0.94])
    peft(tmp_path, "sentiment", "lora", rate, [0.88, 0.90, 0.92])
    sentiment(tmp_path, "prompt", [0.80, 0.80, 0.80])
    peft(tmp_path, "sentiment", "prompt", 0.3, [0.70, 0.70, 0.71])   # another rate than ptune's choice
    data, rates = view(tmp_path)
    row = rc.peft_row(data, rates, "sentiment", "lora")
    # +2 points; standard error sqrt(2 * 0.02² / 3) = 1.63 points; within two of them: the same
    assert row[2:6] == ["92.0 ± 2.0 (3)", "90.0 ± 2.0 (3)", "+2.0 ± 1.6", "yes"]
    assert row[6:] == ["74,498 / 74,498", "all early"]
    row = rc.peft_row(data, rates, "sentiment", "prompt")
    assert row[1].endswith("(PEFT at another rate!)") and row[4:6] == ["+9.7 ± 0.3", "no"]
    assert rc.peft_row(data, rates, "sentiment", "full")[2:4] == ["not run yet", "not run yet"]
    assert rc.peft_row(data, rates, "spam", "lora")[2:4] == ["not run yet", "not run yet"]


# Provisional: spam, topic and genre have not run (a verdict on every task reads without the mark).
@pytest.mark.parametrize("lora, verdict", [([0.905, 0.915, 0.91], "agrees (provisional)"),
                                           ([0.85, 0.86, 0.855], "does not agree (provisional)")])
def test_lora_verdict_follows_the_numbers(tmp_path, lora, verdict):
    sentiment(tmp_path, "full", [0.91, 0.92, 0.915])
    sentiment(tmp_path, "lora", lora)
    data, rates = view(tmp_path)
    claim, word, evidence = rc.gap_verdict(data, rates, "lora", rc.report.near_full, "rule")
    assert claim == rc.CLAIMS["lora"] and word == verdict
    assert evidence.startswith(f"lora − full {(sum(lora) - 2.745) / 3 * 100:+.1f} ± ")
    assert "over sentiment; rule; not yet: lora spam: 0/3 seeds run; full spam: 0/3 seeds run" in evidence


def test_prompt_verdict_and_open_verdicts(tmp_path):
    sentiment(tmp_path, "full", [0.91, 0.92, 0.915])
    sentiment(tmp_path, "prompt", [0.70, 0.71, 0.72])
    sentiment(tmp_path, "lora", [0.90, 0.91])   # seed 2 not finished
    data, rates = view(tmp_path)
    table = rc.verdicts(data, rates)[2]
    assert f"| {rc.CLAIMS['prompt']} | agrees (provisional) | prompt − full -20.5 ± " in table
    assert f"| {rc.CLAIMS['lora']} | open: lora sentiment: 2/3 seeds run; " in table
    assert f"| {rc.CLAIMS['bitfit']} | open: bitfit: learning-rate selection 0/3 rates run |" in table
    assert f"| {rc.CLAIMS['hybrid']} | open: lora sentiment: 2/3 seeds run; lora+prompt: " in table
    assert f"| {rc.CLAIMS['forgetting']} | open: not measured in the converged study" in table


def test_hybrid_verdict(tmp_path):
    for method, tests in (("lora", [0.90] * 3), ("prompt", [0.80] * 3), ("lora+prompt", [0.895] * 3)):
        sentiment(tmp_path, method, tests)
    assert rc.hybrid_verdict(*view(tmp_path))[1:] == (
        "agrees", "sentiment test: lora 90.0, prompt 80.0, lora+prompt 89.5; agrees if the hybrid is within 1 "
        "point of its better part or above it")


def test_kshot_mean_std_over_draws(tmp_path):
    sentiment(tmp_path, "lora", [0.9] * 3)
    for seed, test in zip(STUDY.SHOT_SEEDS, [0.6, 0.7, 0.8, 0.7, 0.7]):
        point(tmp_path, "kshot-16", "lora", STUDY.GRID["lora"][1], seed, test=test)
    data, rates = view(tmp_path)
    rows = {r.split(" | ")[0].strip("| "): r for r in rc.kshot(data, rates)[2].splitlines()[2:]}
    assert rows["lora"] == "| lora | 70.0 ± 7.1 (5) | not run yet | not run yet | 90.0 ± 0.0 (3) |"
    assert rows["full"] == "| full | not run yet | not run yet | not run yet | not run yet |"


def test_partial_study_renders_with_not_run_yet(tmp_path):
    sentiment(tmp_path, "full", [0.9] * 3)
    data, _ = view(tmp_path)
    text = rc.render(data, str(tmp_path), "docs/study-converged")
    assert "--workdir docs/study-converged" in text
    assert "| select-sentiment | 27 | 3 | bitfit (3), lora (3)," in text
    assert "| seeds-sentiment | 18 | 2 | bitfit (2)," in text and "| kshot-256 | 15 | 0 | full (5), lora (5)" in text
    assert "| lora | – | not run yet |" in text and "[RESULTS_LOW_BUDGET.md](RESULTS_LOW_BUDGET.md)" in text
    assert rc.render(rc.load(str(tmp_path / "none")), str(tmp_path / "none")).count("not run yet") > 50


def test_collect_copies_the_records_the_report_reads(tmp_path):
    work, records = tmp_path / "work", tmp_path / "docs" / "study-converged"
    d = point(work, "select-sentiment", "full", 5e-5, 0)
    (d / "checkpoints").mkdir()
    (d / "events.out.tfevents.1.vm").write_text("x")
    unfinished = point(work, "seeds-sentiment", "full", 5e-5, 1)
    (unfinished / "final_metrics.json").unlink()
    (work / "seeds-sentiment" / "results.jsonl").unlink()   # its job has not collected a row yet
    peft(work, "spam", "lora", 5e-4, [0.9])
    rc.collect(str(work), str(records))
    assert sorted(os.listdir(records)) == ["peft-spam.jsonl", "select-sentiment"]
    assert sorted(os.listdir(records / "select-sentiment")) == [d.name, "results.jsonl"]
    assert sorted(os.listdir(records / "select-sentiment" / d.name)) == sorted(rc.RECORDS)
    assert rc.render(rc.load(str(records)), str(records), "w") == rc.render(rc.load(str(work)), str(work), "w")


def test_launcher_collects_and_writes_results_md(tmp_path):
    work, docs = tmp_path / "work", tmp_path / "docs"
    sentiment(work, "full", [0.9] * 3)
    script = os.path.join(ROOT, "scripts", "report_converged.py")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, script, f"--workdir={work}", f"--docs={docs}", "--collect"], check=True, env=env,
                   capture_output=True)
    text = (docs / "RESULTS.md").read_text()
    assert f"--workdir {docs / 'study-converged'}" in text and "| full | 5e-05 | 90.0 ± 0.0 (3) |" in text
    out = subprocess.run([sys.executable, script, f"--workdir={tmp_path / 'empty'}"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --workdir ")
