"""Serve many trained tasks from one frozen base: mixed-task requests in, predictions out.

    server = serve.load({"sentiment": "workdirs/sentiment", "qa": "workdirs/qa"})
    server.predict([{"task": "qa", "text": "Hi"}, {"task": "sentiment", "text": "Great film"}])
    # -> [{"task": "qa", "prediction": "Hello."}, {"task": "sentiment", "prediction": "positive", "label": 1}]

Each workdir's adapter comes from its checkpoint (`ptune.training.checkpoint.load_adapter`) and its
config says how to read a request: the task's template, verbalizer and length. Every task
must have been trained on the same base, which is rebuilt once and checked against each
checkpoint's recorded sha256. Classification requests are served in mixed batches through
`Bank.classify`, generation requests (lm and generate tasks) through `Bank.generate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ptune import config as config_lib
from ptune import models, partition
from ptune.data import batching, tasks
from ptune.data.templates import Template
from ptune.errors import UserError
from ptune.inference import bank as bank_lib
from ptune.training import builder, checkpoint


@dataclasses.dataclass(frozen=True)
class ServedTask:
    kind: str                       # "classify" or "generate"
    template: Template
    max_length: int
    label_names: tuple[str, ...]


class Server:
    def __init__(self, bank: bank_lib.Bank, tokenizer, served: dict[str, ServedTask], batch_size: int = 16,
                 max_new_tokens: int = 32):
        self.bank, self.tokenizer, self.served = bank, tokenizer, served
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        # One padded length for every classification batch, so batches of any task mix share one compile.
        self.length = max((t.max_length for t in served.values() if t.kind == "classify"), default=0)

    def predict(self, requests: Sequence[dict]) -> list[dict]:
        """One prediction per request, in order: {"task", "prediction"} (and "label" for classes)."""
        for i, r in enumerate(requests):
            if not (isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("text"), str)):
                raise UserError(f"request {i} is {r!r}; each request needs a string 'task' and 'text'")
        self.bank.task_slots([r["task"] for r in requests])   # unknown task names fail before any work
        out: list[dict | None] = [None] * len(requests)
        for kind, serve_batch in (("classify", self._classify), ("generate", self._generate)):
            rows = [i for i, r in enumerate(requests) if self.served[r["task"]].kind == kind]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                # Pad the last batch with copies of its first request: one batch shape, one compile.
                padded = [requests[i] for i in chunk] + [requests[chunk[0]]] * (self.batch_size - len(chunk))
                for i, prediction in zip(chunk, serve_batch(padded)):
                    out[i] = {"task": requests[i]["task"], **prediction}
        return out

    def _classify(self, requests):
        ids = np.full((len(requests), self.length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(ids)
        family = self.bank.config.family
        for i, r in enumerate(requests):
            task = self.served[r["task"]]
            row = batching.encode([{"text": r["text"], "label": 0}], "classify", task.template, self.tokenizer,
                                  family, task.max_length)
            ids[i, :task.max_length], mask[i, :task.max_length] = row["input_ids"][0], row["attention_mask"][0]
        labels = self.bank.classify(ids, mask, [r["task"] for r in requests]).argmax(-1)
        return [{"prediction": self.served[r["task"]].label_names[k], "label": int(k)}
                for r, k in zip(requests, labels)]

    def _generate(self, requests):
        room = self.bank.config.max_positions - self.max_new_tokens - self.bank.sites.extra_positions
        prompts = []
        for r in requests:
            prompt = batching.prompt(self.tokenizer, self.served[r["task"]].template, r["text"])
            prompts.append(prompt[-room:])   # too long: keep the end, next to the answer
        eos = self.tokenizer.eos_id
        tokens = self.bank.generate(prompts, [r["task"] for r in requests], self.max_new_tokens, eos_id=eos,
                                    pad_id=self.tokenizer.pad_id)
        return [{"prediction": self.tokenizer.decode(row[:_until(row, eos)].tolist())} for row in tokens]


def _until(row, eos: int) -> int:
    hits = np.flatnonzero(row == eos)
    return int(hits[0]) if hits.size else len(row)


def load(workdirs: dict[str, str], which: str | int = "latest", capacity: int | None = None,
         batch_size: int = 16, max_new_tokens: int = 32) -> Server:
    """A Server for {task name: trained workdir}; every task must share one base."""
    if not workdirs:
        raise UserError("serve: give at least one task=workdir")
    loaded = {name: checkpoint.load_adapter(workdir, which) for name, workdir in workdirs.items()}
    for config, _, _ in loaded.values():   # custom methods and tasks the runs' config files registered
        config_lib.import_recorded(config)
    identities = {name: {k: v for k, v in record["base"].items() if k != "sha256"}
                  for name, (_, _, record) in loaded.items()}
    if len({repr(sorted(i.items())) for i in identities.values()}) > 1:
        raise UserError(f"the tasks were trained on different bases {identities}; one bank serves one base: "
                        "serve them separately")
    bases = {}

    def base_of(config):   # read once per model config (once in all, but for overrides such as dropout)
        key = repr(sorted(config.model.to_dict().items()))
        bases[key] = bases.get(key) or builder.base_model(config)
        return bases[key]

    adapters, served = {}, {}
    for name, (config, trainable, record) in loaded.items():
        # The run rebuilt as it was set up (its method's frozen leaves too, e.g. PiSSA's initial factors),
        # so that its frozen part is checked, and folded with the adapter, as training saw it.
        run = builder.setup(config, training=False, base=base_of(config))
        frozen = partition.split(run.params, run.labels)[1]
        checkpoint.check_base(record["base"], checkpoint.base_record(config, frozen),
                              f"{workdirs[name]} (task {name!r})")
        adapters[name] = bank_lib.TaskAdapter.from_trained(run.method, run.model, partition.merge(trainable, frozen),
                                                           run.label_ids or ())
        kind = "classify" if run.task.kind == "classify" else "generate"
        served[name] = ServedTask(kind, run.template, config.task.max_length, tasks.class_names(run.task, run.template))
    first = next(iter(loaded.values()))[0]
    model_cfg, state, tokenizer = base_of(first)
    base = builder.base_params(first, models.build(model_cfg), state)
    bank = bank_lib.Bank(model_cfg, base, adapters, capacity)
    return Server(bank, tokenizer, served, batch_size, max_new_tokens)
