"""The Python API: a run you can step, evaluate and query from a notebook (docs/API.md).

    config = ptune.load_config("experiments/sentiment_smollm2.py", {"train.steps": 20})
    tuner = ptune.setup(config)              # validates everything, builds model, data, optimizer
    tuner.train_steps(10)                    # {"loss": mean, "grad_norm": mean, "steps": 10, "count": ...}
    tuner.evaluate()                         # {"loss", "accuracy" | "perplexity", "count"}
    tuner.predict(["Great phone."])          # ["positive"]
    tuner.generate("The capital of France is", max_new_tokens=8)
    ptune.load_adapter("workdirs/sentiment").predict(["Awful."])   # a run trained by scripts/train.py

It is a door to the same functions the launcher calls (ptune.training.train): the same validation and
messages, and the same steps: N `train_steps` equal the launcher's first N steps bitwise.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections

from ptune import config as config_lib
from ptune import partition, sharding
from ptune.data import batching, tasks
from ptune.data.templates import Template
from ptune.errors import UserError
from ptune.inference import generate as generate_lib
from ptune.training import builder, checkpoint, compute, evals, train

__all__ = ["Tuner", "load_adapter", "load_config", "setup"]


def load_config(spec: str | None = None, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A run's config: the experiment file `spec` ("experiments/x.py" or "experiments/x.py:argument",
    loaded as the launchers load it), or `ptune.config.base_config()` when None, with `overrides`
    applied: dotted keys as on the command line, e.g. {"train.steps": 20, "method.rank": 4,
    "optim.groups.lora.learning_rate": 3e-3}. A key that does not exist or a value out of range is
    a UserError naming it."""
    if spec is not None and not isinstance(spec, str):
        raise UserError(f"load_config: spec={spec!r} must be a config file path such as "
                        "'experiments/default.py' or 'experiments/default.py:prompt' (or None for the defaults)")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise UserError(f"load_config: overrides={overrides!r} must be a dict of dotted keys such as "
                        "{'train.steps': 20}")
    config = config_lib.base_config() if spec is None else config_lib.load(spec)
    return config_lib.override(config, dict(overrides or {}), "load_config") if overrides else config


def setup(config: ml_collections.ConfigDict) -> Tuner:
    """A `Tuner` for `config` (from `load_config`), built by `ptune.training.builder.setup`: it validates the
    whole config (one-line UserErrors naming the key and the fix), loads the model and the data,
    labels the parameters and builds the optimizer. Writes nothing."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"setup: config is a {type(config).__name__}, not an ml_collections ConfigDict; make one "
                        "with ptune.load_config(spec, {'dotted.key': value, ...})")
    return Tuner(builder.setup(config))


def load_adapter(workdir: str, which: str | int = "latest") -> Tuner:
    """An inference-ready `Tuner` (evaluate, predict, generate) from a run's checkpoint: "latest",
    "best" (by config.checkpoint.best_metric; needs keep_best > 0) or a step. The workdir is one that
    scripts/train.py (or `ptune.training.train.train_and_evaluate`) trained; the frozen base is rebuilt from
    the run's config and must be the one it was trained on (its sha256 is checked)."""
    config, trainable, record = checkpoint.load_adapter(workdir, which)
    run = builder.setup(config, training=False)   # no optimizer state: it evaluates, predicts, generates
    base = checkpoint.base_record(config, partition.split(run.params, run.labels)[1])
    checkpoint.check_base(record["base"], base, f"{workdir}/{checkpoint.DIRECTORY}/{record['step']}",
                          config.checkpoint.allow_base_mismatch)
    return Tuner(run, trainable, record["step"], loaded_from=workdir)


class Tuner:
    """A run held in memory: the trainable and frozen parameters laid out on the devices, the
    optimizer state and the step. Make one with `ptune.setup` or `ptune.load_adapter`.

    Attributes: `config` (the run's config), `task`, `method`, `model`, `tokenizer`, `template` (the
    prompt template of the run), `summary` (parameter counts per label), `step` (steps trained).
    """

    def __init__(self, run: builder.Run, trainable=None, step: int = 0, loaded_from: str | None = None):
        self.config, self.task, self.method, self.model = run.config, run.task, run.method, run.model
        self.tokenizer, self.template, self.summary = run.tokenizer, run.template, run.summary
        self.step, self._run, self._loaded_from = step, run, loaded_from
        fresh, frozen = partition.split(run.params, run.labels)
        # As train.train_and_evaluate lays a run out, so that the steps equal the launcher's. The
        # train step donates the trainable arrays, so run.params is not used after this.
        self._where = compute.layout(run, fresh, frozen)
        self._trainable = sharding.put(fresh if trainable is None else trainable, self._where.trainable)
        self._frozen = sharding.put(frozen, self._where.frozen)
        self._eval_step = compute.make_eval_step(run, self._where)
        self._opt_state = self._step_fn = self._classify = None   # built when first needed
        self._pending = []   # the step's non-finite flag (see train.check_finite)

    def __repr__(self) -> str:
        model = self.config.model.checkpoint or self.config.model.preset
        return (f"Tuner(method={self.method.name!r}, model={model!r}, task={self.task.name!r}, step={self.step}, "
                f"trainable={self.summary.trainable:,})")

    @property
    def params(self) -> dict:
        """The whole parameter tree (trainable and frozen leaves) as it is now. The next `train_steps`
        donates its trainable arrays: copy them (`jax.device_get`) to keep them."""
        return partition.merge(self._trainable, self._frozen)

    @property
    def trainable(self) -> dict:
        """The trainable subtree as it is now (what a checkpoint saves); the next `train_steps` donates
        its arrays: copy them (`jax.device_get`) to keep them."""
        return self._trainable

    def train_steps(self, n: int) -> dict:
        """Train `n` more steps; returns means over them with their counts: `loss` (per example for
        classification, per predicted token otherwise, as the launcher logs it), `grad_norm`,
        `steps` (n), `count` (what the loss averages over: examples or predicted tokens),
        `skipped_steps` (non-finite steps left out with config.train.nonfinite='skip') and
        `examples_per_s`.

        Step k uses the batch and dropout key of the launcher's step k, so the parameters after
        N steps equal a scripts/train.py run's at step N. Steps may go past config.train.steps; the
        learning-rate schedule is built for config.train.steps and keeps its final value after
        it (set train.steps to the total you plan when using a decaying schedule). A non-finite
        step is never applied; with nonfinite='stop' (default) it raises a UserError naming it,
        and `step` stays at it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"train_steps: n={n!r} must be an integer >= 1 (the number of steps to take)")
        run, tc = self._run, self.config.train
        if not self.method.trains:
            raise UserError(f"train_steps: method {self.method.name!r} trains nothing; evaluate, predict or "
                            "generate with it, or choose a method that trains (config.method.name)")
        if self._loaded_from is not None:
            raise UserError(f"train_steps: a tuner from ptune.load_adapter has no optimizer state; to train "
                            f"{self._loaded_from} further, raise config.train.steps and rerun scripts/train.py on it "
                            "(it resumes from its newest checkpoint)")
        if self._step_fn is None:   # as train._train starts a run
            self._opt_state = compute.init_opt_state(run, self._where, self._trainable)
            self._step_fn = compute.make_step_fn(run, self._where, self._frozen, self._pending)

        def step_fn(state, step):
            (self._trainable, self._opt_state), metrics = self._step_fn(state, step)
            if tc.nonfinite == "stop":   # at once, so that the tuner stays at the step that failed
                train.check_finite(self._pending, "stop")
            self._pending.clear()
            self.step = step + 1
            return (self._trainable, self._opt_state), metrics

        # The launcher's loop, logging once: after the n-th step.
        end = self.step + n
        loop = types.SimpleNamespace(**{**tc.to_dict(), "steps": end, "log_every": end})
        for _, _, logged in train.train_steps(loop, step_fn, (self._trainable, self._opt_state), self.step,
                                              self.method.name, show=True):
            pass
        metrics = logged.train_metrics(tc.batch_size)
        return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "steps": n, **metrics}

    def evaluate(self, split: str | None = None) -> dict:
        """Metrics of the current parameters on a split (default config.train.eval_split), as the
        launcher evaluates: `loss` and `accuracy` (classification) or `perplexity`, with `count`
        (examples, or predicted tokens)."""
        split = self.config.train.eval_split if split is None else split
        return compute.evaluate(self._run, self.params, self._split(split), self._eval_step, self._where)

    def _split(self, split) -> str:
        """`split`, encoded as setup encodes the run's splits (once)."""
        data, task = self._run.data, self.task
        if not isinstance(split, str):
            raise UserError(f"evaluate: split={split!r} must be a split name; splits: {sorted(task.splits)}")
        if data.get(split) is None:   # (a method that trains nothing has no encoded train split)
            encode = builder.encoder(self.config, task, self.template, self.tokenizer, self.model.config.family)
            data[split] = encode(task.split(split))
        return split

    def predict(self, texts: Iterable[str]) -> list[str]:
        """One prediction per text: the class name for a classification task (the run's template,
        verbalizer or head, as evaluation reads it), else the generated text (`generate` with its
        defaults, inside the task's template)."""
        texts = _texts("predict", texts, "texts")
        if self.task.kind != "classify":
            return self.generate(texts)
        if not texts:
            return []
        if self._classify is None:
            self._classify = evals.classifier(self._run, self._where)
        _, classes = self._classify(self.params, [{"text": t, "label": 0} for t in texts], self.template)
        names = tasks.class_names(self.task, self.template)
        return [names[k] for k in classes]

    def generate(self, prompts: str | Iterable[str], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str | list[str]:
        """Text generated after each prompt (a string for a string): greedy when temperature is 0,
        else sampled (top_k, top_p; `seed` fixes the draw). A generation task's prompts go into its
        template, as in training; other prompts are used as written. Stops at the tokenizer's EOS.
        Needs a causal model."""
        single = isinstance(prompts, str)
        texts = _texts("generate", [prompts] if single else prompts, "prompts")
        template = self.template if self.task.kind == "generate" else Template()
        ids = [batching.prompt(self.tokenizer, template, t) for t in texts]
        eos, pad, out = self.tokenizer.eos_id, self.tokenizer.pad_id, []
        size = self.config.train.eval_batch_size
        for start in range(0, len(ids), size):
            rows = generate_lib.generate(self.model, self.params, ids[start:start + size], max_new_tokens, eos_id=eos,
                                         pad_id=pad, temperature=temperature, top_k=top_k, top_p=top_p,
                                         rng=jax.random.fold_in(jax.random.key(seed), start))
            for row in rows.tolist():
                out.append(self.tokenizer.decode(row[:row.index(eos)] if eos in row else row))
        return out[0] if single else out


def _texts(who: str, texts, name: str) -> list[str]:
    """`texts` (a list, or any iterable such as a pandas column) as a list of strings, or a UserError
    naming the one that is not a string."""
    if isinstance(texts, (str, bytes, Mapping)) or not isinstance(texts, Iterable):
        raise UserError(f"{who}: {name} must be a list of strings, got {type(texts).__name__}"
                        + ("; wrap one text as [text]" if isinstance(texts, str) else ""))
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"{who}: {name}[{bad}] is {texts[bad]!r}, not a string; give every one as text")
    return texts
