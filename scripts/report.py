"""Tables, plots and docs/RESULTS_LOW_BUDGET.md from a finished (or partly finished) low-budget study:

    python scripts/report.py --workdir workdirs/study [--docs docs]

(docs/RESULTS.md is the converged study's, scripts/report_converged.py, which links to this one and
imports the table and verdict helpers below.)

Reads what scripts/study.py wrote: <part>/results.jsonl and each point's metrics.jsonl and
predictions.json, cost.json and multitask.json. Every number in the report is computed here from
those files; each claim of the literature gets a verdict computed from the numbers (with the
threshold stated). A row whose runs are missing says so instead of a number.
"""

import collections
import itertools
import json
import os
import statistics

os.environ.setdefault("MPLBACKEND", "Agg")

from absl import flags

from ptune import atomic, cli, config
from ptune.errors import UserError
from ptune.training import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = config.load_module(os.path.join(ROOT, "experiments", "study.py"))
PARTS = STUDY.PARTS
ORDER = ["full", "bitfit", "lora", "adapter", "prefix", "prompt", "ptuning_v2", "ia3", "lora+prompt", "manual"]
ENCODER_TASKS = list(STUDY.ENCODER_TASKS)
DOMAINS = ["amazon", "imdb", "yelp"]
TARGET = 0.80   # "time to reach a target accuracy": validation accuracy on pooled sentiment (encoder)
CLOSE = 0.01    # "close to full fine-tuning": within one accuracy point (the papers' own reading)
MODEL = {"encoder": "MiniLM", "decoder": "SmolLM2"}
OUTPUT = "RESULTS_LOW_BUDGET.md"
# The literature's claims each study gives a verdict on (this report and scripts/report_converged.py).
CLAIMS = {
    "lora": "LoRA matches full fine-tuning (Hu et al. 2021)",
    "bitfit": "BitFit within about a point of full fine-tuning (Ben Zaken et al. 2022)",
    "adapter": "Adapters near full fine-tuning with a few % of the parameters (Houlsby et al. 2019)",
    "prefix": "Prefix tuning comparable to fine-tuning (Li & Liang 2021)",
    "prompt": "Prompt tuning falls short of fine-tuning below ~10B parameters (Lester et al. 2021)",
    "forgetting": "LoRA forgets less than full fine-tuning (Biderman et al. 2024)",
    "manual": "Manual prompts are sensitive to phrasing (Zhao et al. 2021; Sclar et al. 2023)",
    "hybrid": "LoRA + prompt is 'the best of both worlds'",
}


def define_flags():
    """This launcher's flags, defined only when it runs (scripts/report_converged.py imports the module
    and defines its own)."""
    flags.DEFINE_string("workdir", None, "The study's directory (scripts/study.py --workdir).")
    flags.DEFINE_string("docs", "docs", f"Where {OUTPUT} and results/*.png go.")
    flags.mark_flags_as_required(["workdir"])


# ---- reading -------------------------------------------------------------------------------------

def read_json(path, lines=False, default=None):
    """A JSON (or JSON-lines) file's value; `default` when the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)


def load(workdir: str) -> dict:
    out = {}
    for part in PARTS:
        rows = read_json(os.path.join(workdir, part, "results.jsonl"), lines=True, default=[])
        for r in rows:
            r["method"] = r["method"].removesuffix("+head")   # the encoder's fresh head trains in every run
            r["dir"] = os.path.join(workdir, part, r["point"])
        out[part] = rows
    for name in ("cost", "multitask"):
        out[name] = read_json(os.path.join(workdir, f"{name}.json"))
    return out


def curve(row, split="validation", key="accuracy") -> dict[int, float]:
    """{step: metric}; a point rerun after an interruption logged some steps twice: the last wins."""
    logged = read_json(os.path.join(row["dir"], "metrics.jsonl"), lines=True, default=[])
    return {r["step"]: r[key] for r in logged if r["split"] == split and key in r}


def predictions(row) -> dict:
    return read_json(os.path.join(row["dir"], "predictions.json"), default={})


def by(rows, *keys) -> dict:
    groups = collections.defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys) if len(keys) > 1 else r.get(keys[0])].append(r)
    return groups


def values(rows, key) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def mean(xs):
    return statistics.fmean(xs) if xs else None


def std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def pm(xs, scale=100.0, digits=1, always_n=False) -> str:
    """'mean ± std (n)' of a list, in points by default (n shown when not 3, or always); '–' when empty."""
    if not xs:
        return "–"
    n = f" ({len(xs)})" if len(xs) != 3 or always_n else ""
    return f"{mean(xs) * scale:.{digits}f} ± {std(xs) * scale:.{digits}f}{n}"


def ordered(names):
    return sorted(names, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- measures --------------------------------------------------------------------------------------

def domain_accuracy(rows, task_records, domain) -> list[float]:
    """Test accuracy on one sentiment domain, from each seed's saved test predictions."""
    idx = [i for i, r in enumerate(task_records) if r["domain"] == domain]
    out = []
    for r in rows:
        preds = predictions(r).get("test")
        if preds:
            out.append(statistics.fmean(preds[i] == task_records[i]["label"] for i in idx))
    return out


def agreement(lists) -> float | None:
    """Mean pairwise fraction of equal predictions among prediction lists."""
    pairs = [statistics.fmean(a == b for a, b in zip(x, y)) for x, y in itertools.combinations(lists, 2)]
    return mean(pairs)


def template_accuracies(row) -> list[float]:
    return [row[k] for k in sorted(row) if k.startswith("validation_accuracy_t")]


def fragility(rows) -> dict | None:
    """Spread of accuracy over the paraphrased templates (mean over seeds that measured it) and
    agreement of predictions across paraphrases."""
    measured = [r for r in rows if template_accuracies(r)]
    if not measured:
        return None
    spreads = [max(template_accuracies(r)) - min(template_accuracies(r)) for r in measured]
    stds = [statistics.pstdev(template_accuracies(r)) for r in measured]
    agree = [agreement([v for k, v in predictions(r).items() if "_t" in k]) for r in measured]
    return {"mean": mean([mean(template_accuracies(r)) for r in measured]), "spread": mean(spreads),
            "std": mean(stds), "agree": mean([a for a in agree if a is not None]),
            "best": mean([max(template_accuracies(r)) for r in measured]),
            "worst": mean([min(template_accuracies(r)) for r in measured]), "seeds": len(measured)}


def seed_agreement(rows, key="test") -> float | None:
    lists = [predictions(r).get(key) for r in rows]
    lists = [x for x in lists if x]
    return agreement(lists) if len(lists) > 1 else None


def steps_to(row, target) -> int | None:
    reached = [s for s, acc in sorted(curve(row).items()) if acc >= target and s > 0]
    return reached[0] if reached else None


def gap(part_groups, keys, m, metric="validation_accuracy") -> tuple[float, float, int] | None:
    """(mean over tasks of method m's `metric` − full's, its standard error from the
    seeds' spread, number of tasks) over the tasks both ran; None when none."""
    diffs, variances = [], []
    for key in keys:
        a, f = values(part_groups.get(key(m), []), metric), values(part_groups.get(key("full"), []), metric)
        if a and f:
            diffs.append(mean(a) - mean(f))
            variances.append(std(a) ** 2 / len(a) + std(f) ** 2 / len(f))
    return (mean(diffs), sum(variances) ** 0.5 / len(diffs), len(diffs)) if diffs else None


def hybrid_holds(accs: dict) -> bool:
    """'Best of both worlds' on one task: the hybrid within CLOSE of its better part, or above it."""
    return accs["lora+prompt"] >= max(accs["lora"], accs["prompt"]) - CLOSE


def near_full(known) -> bool | str | None:
    """A 'close to full fine-tuning' claim against gaps [(gap, standard error, tasks)]: False when one
    is below -CLOSE by more than two standard errors, True when all are within CLOSE, else 'inconclusive'."""
    if not known:
        return None
    if any(g < -CLOSE - 2 * se for g, se, _ in known):
        return False
    return True if all(g >= -CLOSE for g, _, _ in known) else "inconclusive"


def falls_short(known) -> bool | str | None:
    """A 'below full fine-tuning' claim: True when every gap is clearly (two standard errors) more than
    CLOSE below, False when one is within CLOSE, else 'inconclusive'."""
    if not known:
        return None
    if all(g < -CLOSE - 2 * se for g, se, _ in known):
        return True
    return False if any(g >= -CLOSE for g, _, _ in known) else "inconclusive"


# ---- report -----------------------------------------------------------------------------------------

class Report:
    def __init__(self, data, docs, workdir, planned=()):
        self.d, self.docs, self.workdir, self.planned = data, docs, workdir, planned
        self.out = []
        self.verdicts = []
        os.makedirs(os.path.join(docs, "results"), exist_ok=True)
        self.cost = {(c["part"], c["method"]): c for c in data["cost"] or []}

    def add(self, *blocks):
        self.out.extend(blocks)

    def verdict(self, claim, agrees: bool | str | None, evidence: str):
        """`agrees`: True, False, None (not measured) or a word of its own ('inconclusive')."""
        word = {None: "not measured", True: "agrees", False: "does not agree"}.get(agrees, agrees)
        self.verdicts.append((claim, word, evidence))

    def plot(self, name, draw):
        import matplotlib.pyplot as plt
        fig = draw(plt)
        path = os.path.join(self.docs, "results", f"{name}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.add(f"![{name}](results/{name}.png)")

    # Each section reads what it needs and says so when it is missing.

    def accuracy(self):
        enc, dec = self.d["encoder"], self.d["decoder"]
        self.add("## Accuracy", "Validation accuracy (%) mean ± std over seeds (n = 3 unless shown); "
                 "test accuracy where the part measured it. MiniLM-L6 (encoder, fresh head), 60 steps of "
                 "batch 8; SmolLM2-135M (decoder, verbalizer), Amazon sentiment, 24 steps of batch 8. BitFit "
                 "does not apply to SmolLM2: LLaMA-family layers have no bias terms.")
        groups = by(enc, "method", "task.name")
        rows = []
        for m in ordered({r["method"] for r in enc}):
            cells = [pm(values(groups[(m, t)], "validation_accuracy")) for t in ENCODER_TASKS]
            rows.append([m, *cells, pm(values(groups[(m, "sentiment")], "test_accuracy")),
                         pm(values(groups[(m, "spam")], "test_accuracy"))])
        if rows:
            rows.append(["majority class", *[majority(t, "validation") for t in ENCODER_TASKS],
                         majority("sentiment", "test"), majority("spam", "test")])
        self.add("### MiniLM-L6 (22.7M)", table(["method", *[f"{t} val" for t in ENCODER_TASKS], "sentiment test",
                                                        "spam test"], rows) if rows else "Not run.")
        dgroups = by(dec, "method")
        rows = []
        for m in ordered(dgroups):
            f = fragility(dgroups[m]) if m == "manual" else None
            extra = f" (templates: best {f['best'] * 100:.1f}, worst {f['worst'] * 100:.1f})" if f else ""
            rows.append([m, pm(values(dgroups[m], "validation_accuracy")) + extra,
                         pm(values(dgroups[m], "test_accuracy"))])
        if rows:
            rows.append(["majority class", *[majority("sentiment", split, domain="amazon")
                                             for split in ("validation", "test")]])
        self.add("### SmolLM2-135M, Amazon sentiment", table(["method", "validation", "test"], rows) if rows
                 else "Not run.")
        self._literature_accuracy(groups, dgroups)

    def _literature_accuracy(self, groups, dgroups):
        """Each claim against the mean gap to full fine-tuning (over the tasks a method ran) at each
        model size, read with its seed noise: 'inconclusive' when the gap is neither within CLOSE
        nor below it by more than two standard errors."""
        sizes = {"MiniLM": (groups, [lambda m, t=t: (m, t) for t in ENCODER_TASKS]),
                 "SmolLM2": (dgroups, [lambda m: m])}
        self.gaps = {m: {size: gap(part, keys, m) for size, (part, keys) in sizes.items()} for m in ORDER[1:-1]}

        def say(m):
            return "; ".join(f"{size} {m} − full {g[0] * 100:+.1f} ± {g[1] * 100:.1f} points (over {g[2]} task(s))"
                             for size, g in self.gaps[m].items() if g) or "–"

        def known(m):
            return [g for g in self.gaps[m].values() if g]
        rule = f"; agrees if no more than {CLOSE * 100:.0f} point below at every size (± = standard error over seeds)"
        self.verdict(CLAIMS["lora"], near_full(known("lora")), say("lora") + rule)
        self.verdict(CLAIMS["bitfit"], near_full(known("bitfit")), say("bitfit"))
        self.verdict(CLAIMS["adapter"], near_full(known("adapter")), say("adapter"))
        self.verdict(CLAIMS["prefix"], near_full(known("prefix")), say("prefix"))
        self.verdict(CLAIMS["prompt"], falls_short(known("prompt")),
                     say("prompt") + "; agrees if clearly (two standard errors) more than a point below at both "
                     "(small) sizes")

    def cost_section(self):
        self.add("## Cost per method", "One fresh process per model and method (scripts/study.py cost stage) "
                 "on its whole training set, batch 8 (MiniLM: its whole 60-step recipe; SmolLM2: 8 steps): "
                 "step time = median over the steps after the first two; first = the first two steps "
                 "(compilation included); job = wall time of the process (imports, model load, training, one "
                 "evaluation, the checkpoint); peak = the process's peak resident memory; adapter = the trained "
                 "subtree as saved (Orbax trainable/ + meta/ on disk); checkpoint = the step directory "
                 "(adapter + AdamW state).")
        if not self.cost:
            self.add("Not run.")
            return
        rows = []
        for (part, m), c in sorted(self.cost.items(), key=lambda kv: (kv[0][0] != "encoder", ORDER.index(kv[0][1]))):
            total = c["trainable_params"] / max(self._total(part), 1)
            rows.append([f"{MODEL[part]} {m}", f"{c['trainable_params']:,}", f"{total * 100:.3f}",
                         f"{c['step_s']:.3f}", f"{c['first_steps_s']:.1f}", f"{c['wall_s']:.0f}",
                         human(c["peak_rss_bytes"]), human(c["adapter_bytes"]), human(c["checkpoint_bytes"])])
        self.add(table(["model, method", "trainable", "%", "step s", "first 2 steps s", "job s", "peak RSS",
                        "adapter", "checkpoint"], rows))

        def draw(plt):
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for ax, key, label in zip(axes, ("step_s", "peak_rss_bytes", "adapter_bytes"),
                                      ("step time (s)", "peak RSS (bytes)", "adapter bytes on disk")):
                for part, marker in (("encoder", "o"), ("decoder", "s")):
                    ms = [m for m in ORDER if (part, m) in self.cost]
                    ax.plot(range(len(ms)), [self.cost[(part, m)][key] for m in ms], marker, label=part)
                    ax.set_xticks(range(len(ms)), ms, rotation=60)
                ax.set_ylabel(label)
                if key == "adapter_bytes":
                    ax.set_yscale("log")
                ax.legend()
            return fig
        self.plot("cost", draw)
        self._time_to_target()

    def _total(self, part):
        rows = self.d["encoder" if part == "encoder" else "decoder"]
        full = [r for r in rows if r["method"] == "full"]
        return full[0]["trainable_params"] if full else 0

    def _time_to_target(self):
        rows = []
        for m, group in sorted(by([r for r in self.d["encoder"] if r.get("task.name") == "sentiment"], "method").items(),
                               key=lambda kv: ORDER.index(kv[0])):
            steps = [steps_to(r, TARGET) for r in group]
            reached = [s for s in steps if s is not None]
            c = self.cost.get(("encoder", m))
            seconds = f"{mean(reached) * c['step_s']:.1f}" if reached and c else "–"
            rows.append([m, f"{len(reached)}/{len(steps)}", f"{mean(reached):.0f}" if reached else "not in 60",
                         seconds])
        self.add(f"### Time to {TARGET * 100:.0f}% validation accuracy (MiniLM, pooled sentiment, evaluated every "
                 "10 steps; seconds = steps x the method's step time above)",
                 table(["method", "seeds reaching it", "steps", "seconds"], rows) if rows else "Not run.")

    def data_efficiency(self):
        self.add("## Data efficiency", "MiniLM on pooled sentiment, K examples per class (each seed draws its own "
                 "K-shot set), 60 steps of batch 8; 'all' = the 2,400-sentence training set (the accuracy grid).")
        rows = self.d["data"] + [r for r in self.d["encoder"] if r.get("task.name") == "sentiment"]
        def k_of(r):
            return r.get("task.options", {}).get("k_shot") or "all"
        groups = by([dict(r, k=k_of(r)) for r in rows], "method", "k")
        methods = [m for m in ORDER if any(key[0] == m and key[1] != "all" for key in groups)]
        ks = [16, 64, 256, "all"]
        self.add(table(["method", *[f"K={k}" for k in ks]],
                       [[m, *[pm(values(groups.get((m, k), []), "validation_accuracy")) for k in ks]]
                        for m in methods]) if methods else "Not run.")
        if methods:
            def draw(plt):
                fig, ax = plt.subplots(figsize=(6, 4))
                for m in methods:
                    xs = [i for i, k in enumerate(ks) if groups.get((m, k))]
                    ys = [mean(values(groups[(m, ks[i])], "validation_accuracy")) for i in xs]
                    es = [std(values(groups[(m, ks[i])], "validation_accuracy")) for i in xs]
                    ax.errorbar(xs, ys, es, marker="o", capsize=3, label=m)
                ax.set_xticks(range(len(ks)), [str(k) for k in ks])
                ax.set_xlabel("examples per class")
                ax.set_ylabel("validation accuracy")
                ax.legend()
                return fig
            self.plot("data_efficiency", draw)

    def forgetting(self):
        dec = by(self.d["decoder"], "method")
        base = mean(values(dec.get("manual", []), "lm_perplexity"))
        self.add("## Forgetting", "Brown-corpus perplexity of SmolLM2 (20 validation documents, first 128 tokens) "
                 "after each method's sentiment training; manual = the untouched base. Soft prompts and prefixes "
                 "stay in the model when it reads Brown text, as they would when the adapted model is reused.")
        if base is None:
            self.add("Not run.")
            return
        rows, points = [], []
        for m in ordered(dec):
            ppl = values(dec[m], "lm_perplexity")
            acc = mean(values(dec[m], "validation_accuracy"))
            rows.append([m, f"{mean(ppl):.2f} ± {std(ppl):.2f}", f"{(mean(ppl) - base):+.2f}",
                         f"{acc * 100:.1f}" if acc is not None else "–"])
            if m != "manual":
                points.append((m, mean(ppl) - base, acc))
        self.add(table(["method", "Brown perplexity", "change vs base", "sentiment val acc"], rows))
        changes = {m: d for m, d, _ in points}
        if "lora" in changes and "full" in changes:
            self.verdict(CLAIMS["forgetting"],
                         changes["lora"] < changes["full"],
                         f"Brown perplexity change: LoRA {changes['lora']:+.2f}, full {changes['full']:+.2f} "
                         f"(base {base:.2f})")

        def draw(plt):
            fig, ax = plt.subplots(figsize=(6, 4))
            for m, d, acc in points:
                ax.scatter(acc, d)
                ax.annotate(m, (acc, d))
            ax.set_xlabel("sentiment validation accuracy")
            ax.set_ylabel("Brown perplexity change vs base")
            return fig
        self.plot("forgetting", draw)

    def fragility_section(self):
        self.add("## Prompt fragility and consistency",
                 "Accuracy over the task's 8 paraphrased templates (trained on template 0, evaluated under each; "
                 "manual = zero-shot under each), spread = max − min and std in points; agreement = mean pairwise "
                 "share of equal predictions across paraphrases, and across seeds on the test split. A method near "
                 "the majority class predicts nearly one class under every phrasing: its small spread and high "
                 "agreement say it learned little, not that it is robust.")
        rows, bars = [], {}
        for part, name in (("encoder", "MiniLM sentiment"), ("decoder", "SmolLM2 Amazon")):
            groups = by([r for r in self.d[part] if r.get("task.name", "sentiment") == "sentiment"], "method")
            for m in ordered(groups):
                f = fragility(groups[m])
                seeds = seed_agreement(groups[m])
                if f:
                    bars[(name, m)] = f["spread"]
                rows.append([f"{name} {m}", f"{f['mean'] * 100:.1f}" if f else "–",
                             f"{f['spread'] * 100:.1f}" if f else "–",
                             f"{f['std'] * 100:.1f}" if f else "–", f"{f['agree'] * 100:.1f}" if f else "–",
                             f"{seeds * 100:.1f}" if seeds is not None else "–",
                             f"{f['seeds']}" if f else "0"])
        self.add(table(["model, method", "mean accuracy", "spread", "std", "agreement across paraphrases",
                        "agreement across seeds", "seeds measured"], rows) if rows else "Not run.")
        manual = fragility(by(self.d["decoder"], "method").get("manual", []))
        if manual:
            self.verdict(CLAIMS["manual"],
                         manual["spread"] > 0.05, f"zero-shot SmolLM2: best template {manual['best'] * 100:.1f}%, "
                         f"worst {manual['worst'] * 100:.1f}% (spread {manual['spread'] * 100:.1f} points; "
                         "agrees if more than 5)")
        if bars:
            def draw(plt):
                fig, ax = plt.subplots(figsize=(10, 4))
                names = list(bars)
                ax.bar(range(len(names)), [bars[n] * 100 for n in names])
                ax.set_xticks(range(len(names)), [f"{a.split()[0]} {m}" for a, m in names], rotation=70)
                ax.set_ylabel("accuracy spread over 8 templates (points)")
                return fig
            self.plot("fragility", draw)

    def params_plot(self):
        enc = by(self.d["encoder"], "method")
        dec = by(self.d["decoder"], "method")
        if not enc and not dec:
            return

        def draw(plt):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for groups, marker, label in ((enc, "o", "MiniLM (mean over the tasks run)"), (dec, "s", "SmolLM2 Amazon")):
                for m, rows in groups.items():
                    if m == "manual" or not rows:
                        continue
                    ax.scatter(rows[0]["trainable_params"], mean(values(rows, "validation_accuracy")), marker=marker,
                               label=label if m == "full" else None)
                    ax.annotate(m, (rows[0]["trainable_params"], mean(values(rows, "validation_accuracy"))), fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel("validation accuracy")
            ax.legend()
            return fig
        self.add("## Accuracy against trainable parameters")
        self.plot("accuracy_vs_params", draw)

    def multitask_section(self):
        mt = self.d["multitask"]
        self.add("## Multi-task: one base, adapters swapped",
                 "The encoder's four tasks as LoRA (+ head) adapters in one bank on one MiniLM base "
                 "(ptune.inference.bank) against one fully fine-tuned model per task. Swap = writing one task's adapter into "
                 "the bank; a full model's swap = reading its weights from a local safetensors file.")
        if not mt:
            self.add("Not run.")
            return
        n, adapters = len(mt["tasks"]), sum(mt["adapter_bytes"].values())
        rows = [["adapters in one bank", human(mt["base_bytes"] + adapters),
                 f"{mt['swap_s'] * 1e3:.2f} ms", f"{mt['batch'] / mt['mixed_batch_s']:.0f} (mixed tasks)"],
                ["one full model per task", human(n * mt["full_model_bytes"]),
                 f"{mt['full_model_load_s'] * 1e3:.0f} ms", f"{mt['batch'] / mt['own_model_s']:.0f} (one task)"]]
        self.add(table(["setup", f"storage, {n} tasks", "swap", "examples/s"], rows),
                 "Per-task adapter bytes: " + ", ".join(f"{t} {human(b)}" for t, b in mt["adapter_bytes"].items()) +
                 f". The bank on a one-task batch: {mt['batch'] / mt['single_task_bank_s']:.0f} examples/s.")

    def maintenance(self):
        self.add("## Maintenance: updating one task when new data arrives",
                 "Measured in the cost stage (MiniLM): updating a task is one job that retrains it on its grown training "
                 "set with the study's recipe and writes the new version. Job = its wall time from process start "
                 "to the new version on disk; shipped = what must be redeployed (the adapter; for full "
                 "fine-tuning the whole model, and for BitFit the changed biases, one copy per task); accuracy "
                 "= MiniLM pooled-sentiment validation accuracy of the old version (trained on 256 examples per "
                 "class, data part) and of the updated one (all 2,400 sentences, encoder part).")
        if not self.cost:
            self.add("Not run (needs the cost stage).")
            return
        k256 = by([r for r in self.d["data"] if r.get("task.options", {}).get("k_shot") == 256], "method")
        full_data = by([r for r in self.d["encoder"] if r.get("task.name") == "sentiment"], "method")
        rows = []
        for m in ORDER:
            c = self.cost.get(("encoder", m))
            if not c:
                continue
            accuracy = "–"
            if k256.get(m) and full_data.get(m):
                accuracy = (f"{pm(values(k256[m], 'validation_accuracy'))} → "
                            f"{pm(values(full_data[m], 'validation_accuracy'))}")
            rows.append([m, f"{c['wall_s']:.0f}", f"{c['train_s']:.1f}", human(c["adapter_bytes"]), accuracy])
        self.add(table(["method (MiniLM sentiment)", "update job s", "of which training s", "shipped",
                        "accuracy (K=256 → all)"], rows))

    def model_size(self):
        records = _task_records("sentiment", "test")
        enc = by([r for r in self.d["encoder"] if r.get("task.name") == "sentiment"], "method")
        dec = by(self.d["decoder"], "method")
        rows = []
        for m in ("full", "lora", "prompt", "lora+prompt"):
            e = domain_accuracy(enc.get(m, []), records, "amazon") if records else []
            rows.append([m, pm(e), pm(values(dec.get(m, []), "test_accuracy"))])
        self.add("## Dependence on model size",
                 "Amazon test sentences (the same 100) at the two sizes that ship: MiniLM-L6 (22.7M, encoder, "
                 "trained on all three domains) and SmolLM2 (135M, decoder, trained on Amazon only).",
                 table(["method", "MiniLM 22.7M", "SmolLM2 135M"], rows),
                 "Two sizes, different architectures, objectives and training data: the range is too narrow to "
                 "measure a scaling trend. Lester et al. (2021) found the prompt-tuning gap closes only near 10B "
                 "parameters (T5-XXL); both models here are far below that, so a gap at both is what their result "
                 "predicts, and nothing here can confirm or refute the closing itself.")
        self.domains(enc, records)

    def domains(self, enc, records):
        if not records:
            return
        rows = [[m, *[pm(domain_accuracy(enc[m], records, d)) for d in DOMAINS]] for m in ordered(enc)]
        self.add("### Sentiment test accuracy per domain (MiniLM, one model for the three domains)",
                 table(["method", *DOMAINS], rows))

    def hybrid(self):
        enc = by(self.d["encoder"], "method", "task.name")
        dec = by(self.d["decoder"], "method")
        rows, wins = [], []
        for label, get in [(f"MiniLM {t}", lambda m, t=t: enc.get((m, t), [])) for t in ENCODER_TASKS] + \
                [("SmolLM2 Amazon", lambda m: dec.get(m, []))]:
            accs = {m: mean(values(get(m), "validation_accuracy")) for m in ("lora", "prompt", "lora+prompt")}
            if None in accs.values():
                continue
            rows.append([label, *[f"{accs[m] * 100:.1f}" for m in ("lora", "prompt", "lora+prompt")]])
            wins.append(hybrid_holds(accs))
        self.add("## Hybrid: LoRA + prompt tuning vs its parts", table(["task", "lora", "prompt", "lora+prompt"], rows)
                 if rows else "Not run.")
        if wins:
            self.verdict(CLAIMS["hybrid"], all(wins),
                         f"the hybrid is within a point of its better part or above it on {sum(wins)} of {len(wins)} "
                         "tasks")

    def generation(self):
        groups = by(self.d["generate"], "method")
        self.add("## Generation (ChatterBot Q->A)", "SmolLM2, validation perplexity of the answers given the "
                 "question (24 steps of batch 8 for the trained methods; manual = the template alone).")
        rows = [[m, pm(values(groups[m], "validation_perplexity"), scale=1, digits=2)] for m in ordered(groups)]
        self.add(table(["method", "answer perplexity"], rows) if rows else "Not run.")

    def write(self):
        for section in (self.accuracy, self.params_plot, self.cost_section, self.data_efficiency, self.forgetting,
                        self.fragility_section, self.multitask_section, self.maintenance, self.model_size,
                        self.hybrid, self.generation):
            section()
        verdicts = table(["claim", "verdict", "measured"], self.verdicts)
        intro = (f"Generated by `python scripts/report.py --workdir {self.workdir}` from the records of "
                 "`python scripts/study.py` (experiments/study.py); do not edit by hand. The guide that reads these "
                 "numbers is in BUILD_NOTES.md.")
        regime = ("Every run is in the low-budget regime (MiniLM 60 steps of batch 8, SmolLM2 24) with one "
                  "learning rate per method; the papers trained for thousands of steps with tuned rates, so each "
                  "verdict speaks for this regime.")
        planned = table(["part", "planned points", "finished", "not run (points)"], self.planned)
        title = ("# Results of the low-budget study (not converged): fine-tuning vs prompt-tuning\n\n"
                 "The converged study, which supersedes these runs, is in [RESULTS.md](RESULTS.md).")
        text = "\n\n".join([title, intro,
                            "## The literature's claims against these runs", regime, verdicts,
                            "## What ran", "The sweeps' points (experiments/study.py) that these results hold; a "
                            "point not run is missing from every table below.", planned, *self.out]) + "\n"
        path = os.path.join(self.docs, OUTPUT)
        atomic.write_text(path, text)
        print(f"wrote {path} and {len([b for b in self.out if b.startswith('![')])} plots")


def _task_records(name, split, **options):
    from ptune import assets
    from ptune.data import tasks
    try:
        return tasks.get(name, **options).split(split)
    except assets.AssetError:   # the data set cannot be had here: the rows that need it are left out
        return None


def majority(name, split, **options) -> str:
    """The share (%) of a split's most frequent class: the accuracy of always predicting it."""
    records = _task_records(name, split, **options)
    if not records:
        return "–"
    counts = collections.Counter(r["label"] for r in records)
    return f"{100 * max(counts.values()) / len(records):.1f}"


def coverage(workdir: str) -> list[list]:
    """Per sweep part: the points experiments/study.py plans, how many finished, and the
    unfinished ones grouped by method and task."""
    rows = []
    for part in PARTS:
        points = sweep.points(STUDY.get_config(part), STUDY.get_sweep(part))
        todo = collections.Counter(
            f"{p.overrides['method']} {p.overrides.get('task.name', '')}".strip()
            for p in points if not sweep.finished(os.path.join(workdir, part), p))
        rows.append([part, len(points), len(points) - sum(todo.values()),
                     ", ".join(f"{group} ({n})" for group, n in sorted(todo.items())) or "–"])
    return rows


def main():
    F = flags.FLAGS
    data = load(F.workdir)
    if not any(data[p] for p in PARTS):
        raise UserError(f"{F.workdir} holds no study results (<part>/results.jsonl); run scripts/study.py first")
    Report(data, F.docs, F.workdir, coverage(F.workdir)).write()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
