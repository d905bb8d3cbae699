"""The adapter bank: a mixed batch equals each task run alone; writes never recompile; bad input is refused."""

import contextlib
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from ptune import methods, models, partition
from ptune.inference import bank as bank_lib
from ptune.training import objectives

EOS, PAD = 258, 256


def _base(preset):
    """A random base whose every weight, biases included, is nonzero (so a task's trained bias shows)."""
    cfg = models.model_config(preset)
    rng = np.random.default_rng(0)
    base = models.init(models.build(cfg), jax.random.key(0))
    return cfg, jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), base)


def _trained(cfg, base, name, seed, num_labels=0, **options):
    """(model, method, params): `name` on the shared base with every trainable leaf random and away from
    its identity (drawn with numpy from the abstract shapes: no compilation)."""
    cfg = dataclasses.replace(cfg, num_labels=num_labels)
    method = methods.get(name, cfg, **options)
    if num_labels:
        method = methods.compose(method, methods.get("head", cfg))
    model = models.build(cfg, method.sites)
    shapes = nn.unbox(models.abstract_params(model))
    labels = partition.flatten(method.labels(shapes))
    rng, base = np.random.default_rng(seed), partition.flatten(base)
    params = {p: base[p] if labels[p] == partition.FROZEN else
              base.get(p, float(p.endswith("/ia3"))) + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
              for p, s in partition.flatten(shapes).items()}
    return model, method, partition.unflatten(params)


def _batch(n, length=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, n)
    ids = np.where(np.arange(length) < lengths[:, None], rng.integers(0, 250, (n, length)), PAD).astype(np.int32)
    return {"input_ids": ids, "attention_mask": (np.arange(length) < lengths[:, None]).astype(np.int32)}


def _tasks(cfg, base, specs):
    """{task: (model, method, params, label_ids)} and {task: TaskAdapter} from {task: (method, options, labels)}."""
    runs = {t: _trained(cfg, base, name, seed, **options) + (labels,)
            for seed, (t, (name, options, labels)) in enumerate(specs.items())}
    adapters = {t: bank_lib.TaskAdapter.from_trained(method, model, params, labels)
                for t, (model, method, params, labels) in runs.items()}
    return runs, adapters


def _alone(runs, tasks):
    """{task: (rows of the batch that name it, jitted forward of that task's own model)}."""
    forward = lambda model: jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask,
                                                                         output="logits"))
    return {t: ([i for i, name in enumerate(tasks) if name == t], forward(model)) for t, (model, *_) in runs.items()}


def _check_mixed_batch(bank, runs, tasks, prompts, new_tokens=4, seed=0):
    """Classification and greedy KV-cached generation of the mixed batch, against each task's own
    model run alone (one uncached forward: the last real token's verbalizer logits, and
    teacher-forced, the argmax after each prompt + generated prefix)."""
    batch = _batch(len(tasks), seed=seed)
    logits = bank.classify(batch["input_ids"], batch["attention_mask"], tasks)
    generated = bank.generate(prompts, tasks, new_tokens, eos_id=EOS, pad_id=PAD)
    length = max(map(len, prompts)) + new_tokens
    for task, (rows, forward) in _alone(runs, tasks).items():
        params, labels = runs[task][2], list(runs[task][3])
        last = batch["attention_mask"][rows].sum(1) - 1
        expected = np.asarray(forward(params, batch["input_ids"][rows], batch["attention_mask"][rows]))
        expected = expected[np.arange(len(rows)), last][:, labels]
        np.testing.assert_allclose(logits[rows, :len(labels)], expected, atol=1e-5, rtol=0)
        assert np.isneginf(logits[rows, len(labels):]).all()
        seqs = [prompts[i] + generated[i].tolist() for i in rows]
        ids = np.asarray([s + [PAD] * (length - len(s)) for s in seqs], np.int32)
        mask = (np.arange(length) < np.asarray([len(s) for s in seqs])[:, None]).astype(np.int32)
        picks = np.asarray(forward(params, ids, mask)).argmax(-1)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            assert picks[r, n - 1:n - 1 + new_tokens].tolist() == generated[i].tolist(), (task, i)
    assert len({tuple(r) for r in generated}) > len(runs) // 2   # the adapters really differ
    return logits


# Decoder tasks that differ in every way a bank allows: LoRA rank, alpha and targets, IA3, adapter size and
# placement, trained base biases, and verbalizers of 2 to 4 classes.
DECODER_TASKS = {
    "lora4_houlsby": ("lora+adapter", dict(lora=dict(rank=4, alpha=8.0), adapter=dict(size=8, activation="gelu")),
                         (65, 66)),
    "lora8_ia3": ("lora+ia3", dict(lora=dict(rank=8, alpha=4.0, targets=["c_fc"])), (70, 71, 72)),
    "pfeiffer_bitfit": ("adapter+bitfit", dict(adapter=dict(size=16, placement="pfeiffer", activation="gelu")),
                          (80, 81, 82, 83)),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15], [16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module")
def decoder():
    cfg, base = _base("gpt2-tiny")
    runs, adapters = _tasks(cfg, base, DECODER_TASKS)
    return cfg, base, runs, adapters, bank_lib.Bank(cfg, base, adapters, capacity=5)


def test_mixed_batch_equals_each_task_alone(decoder):
    _, _, runs, _, bank = decoder
    tasks = ["lora4_houlsby", "pfeiffer_bitfit", "lora8_ia3", "pfeiffer_bitfit", "lora4_houlsby"]
    logits = _check_mixed_batch(bank, runs, tasks, PROMPTS)
    assert logits.shape == (5, 4)


def test_prompt_and_prefix_tasks_of_one_length_share_a_bank():
    """Soft prompts (one with LoRA) and prefixes (MLP form, folded by the bank; P-tuning v2) under RoPE."""
    cfg, base = _base("llama-tiny")
    runs, adapters = _tasks(cfg, base, {
        "prompt+prefix": ("prompt+prefix", dict(prompt=dict(length=3, init="uniform"),
                                                prefix=dict(length=2, hidden=16)), (40, 41)),
        "lora+prompt+ptuning_v2": ("lora+prompt+ptuning_v2", dict(prompt=dict(length=3, init="uniform"),
                                                                  ptuning_v2=dict(length=2)), (50, 51, 52))})
    bank = bank_lib.Bank(cfg, base, adapters)
    tasks = ["prompt+prefix", "lora+prompt+ptuning_v2", "lora+prompt+ptuning_v2", "prompt+prefix"]
    _check_mixed_batch(bank, runs, tasks, PROMPTS[:4], seed=3)


def test_mixed_batch_of_bert_heads_with_different_class_counts():
    cfg, base = _base("bert-tiny")
    runs, adapters = _tasks(cfg, base, {"lora": ("lora", dict(rank=2, num_labels=3), ()),
                                        "ia3": ("ia3", dict(num_labels=2), ()),
                                        "adapter": ("adapter", dict(size=4, num_labels=5), ())})
    bank = bank_lib.Bank(cfg, base, adapters)
    tasks = ["ia3", "lora", "adapter", "lora", "ia3"]
    batch = _batch(len(tasks), seed=1)
    logits = bank.classify(batch["input_ids"], batch["attention_mask"], tasks)
    assert logits.shape == (5, 5)
    for task, (model, _, params, _) in runs.items():
        rows = [i for i, t in enumerate(tasks) if t == task]
        expected = jax.jit(lambda p, b: objectives.class_logits(model, p, b, "head"))(
            params, {k: v[rows] for k, v in batch.items()})
        np.testing.assert_allclose(logits[rows, :expected.shape[1]], expected, atol=1e-5, rtol=0)
        assert np.isneginf(logits[rows, expected.shape[1]:]).all()


@contextlib.contextmanager
def _count_compiles():
    """Counts XLA compilations (jax reports each backend compile as a duration event)."""
    compiles = []
    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_swap_and_add_do_not_recompile(decoder):
    _, _, _, adapters, bank = decoder
    one = _batch(1, seed=2)
    ids, mask = (np.repeat(one[k], 4, 0) for k in ("input_ids", "attention_mask"))   # one text, four tasks
    names = list(DECODER_TASKS)
    before = bank.classify(ids, mask, names + [names[0]])
    with _count_compiles() as compiles:
        bank.put(names[0], adapters[names[2]])             # swap: the first task's slot gets the third's adapter
        bank.put("added", adapters[names[1]])              # add into a free slot
        after = bank.classify(ids, mask, names + ["added"])
        bank.remove("added")
        bank.put(names[0], adapters[names[0]])             # swap back
        restored = bank.classify(ids, mask, names + [names[0]])
    assert compiles == []
    np.testing.assert_array_equal(after[0], after[2])      # the swapped task now scores like the third
    np.testing.assert_array_equal(after[3], after[1])      # the added one like the second
    assert not np.allclose(before[0, :2], after[0, :2])
    np.testing.assert_array_equal(restored, before)
    assert sorted(bank.slots) == sorted(names)


def test_unknown_task_names_it_and_the_known_ones_and_changes_nothing(decoder):
    _, _, _, _, bank = decoder
    batch = _batch(2)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sst2'\]; the bank holds "
                                         r"\['lora4_houlsby', 'lora8_ia3', 'pfeiffer_bitfit'\]"):
        bank.classify(batch["input_ids"], batch["attention_mask"], ["lora8_ia3", "sst2"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        bank.generate([[1, 2]], ["nope"], 2, eos_id=EOS, pad_id=PAD)
    assert sorted(bank.slots) == sorted(DECODER_TASKS)


def _state(bank):
    return jax.tree.map(np.asarray, (bank.stacked, bank.label_ids, bank.class_count)), dict(bank.slots)


def test_adapters_that_cannot_share_the_bank_are_refused(decoder):
    cfg, base, _, adapters, bank = decoder
    arrays, slots = _state(bank)

    def adapter(name, seed, **options):
        model, method, params = _trained(cfg, base, name, seed, **options)
        return bank_lib.TaskAdapter.from_trained(method, model, params, (1, 2))

    with pytest.raises(ValueError, match=r"task 'big': transformer/h_0/attn/c_attn/lora_a has shape \(64, 16\), "
                                         r"the bank holds \(64, 8\)"):
        bank.put("big", adapter("lora", 7, rank=16))
    with pytest.raises(ValueError, match=r"task 'flipped': IA3 on transformer/h_0/mlp/c_proj scales the layer's "
                                         "output, another task in the bank the other side"):
        bank.put("flipped", adapter("ia3", 8, feedforward=["c_fc"]))
    with pytest.raises(ValueError, match=r"tasks need prompt lengths \{'the bank': 0, 'soft': 4\}"):
        bank.put("soft", adapter("prompt", 9, length=4, init="uniform"))
    with pytest.raises(ValueError, match="task 'five' has 5 classes; this bank holds at most 4"):
        bank.put("five", dataclasses.replace(adapters["lora8_ia3"], label_ids=(1, 2, 3, 4, 5)))
    after = _state(bank)
    jax.tree.map(np.testing.assert_array_equal, after[0], arrays)
    assert after[1] == slots

    head = _trained(cfg, base, "lora", 10, num_labels=2)
    with pytest.raises(ValueError, match="classify in different ways"):
        bank_lib.Bank(cfg, base, {"verbalizer": adapters["lora8_ia3"],
                                  "head": bank_lib.TaskAdapter.from_trained(head[1], head[0], head[2])})
    with pytest.raises(ValueError, match="the base does not fit model gpt2: missing"):
        bank_lib.Bank(cfg, nn.unbox(models.abstract_params(models.build(models.model_config("llama-tiny")))),
                      {"a": adapters["lora8_ia3"]})
