"""Examples -> padded arrays -> batches whose order depends only on (seed, step)."""

from __future__ import annotations

import numpy as np

from ptune.data.templates import Template


def encode(examples, kind: str, template: Template, tokenizer, family: str, max_length: int):
    """Arrays for a task of `kind` (classify | lm | generate); see the encoders below."""
    if kind == "lm":
        return encode_lm(examples, tokenizer, family, max_length)
    if kind == "generate":
        return encode_generate(examples, template, tokenizer, family, max_length)
    return encode_classification(examples, template, tokenizer, family, max_length)


def encode_classification(examples, template: Template, tokenizer, family: str, max_length: int):
    """Render `template` around each text, right-padded. Truncation policy: only the text is
    cut (from its end), so the template and the verbalizer position always survive.

    Returns {"input_ids", "attention_mask": (N, max_length) int32, "labels": (N,) int32}.
    """
    before, after = template.parts()
    head, tail = tokenizer.specials(family)
    head, tail = head + tokenizer.encode(before), tokenizer.encode(after) + tail
    budget = max_length - len(head) - len(tail)
    if budget <= 0:
        raise ValueError(f"task.max_length={max_length} leaves no room for text after the template "
                         f"({len(head) + len(tail)} tokens); raise it")
    rows = [head + tokenizer.encode(e["text"])[:budget] + tail for e in examples]
    arrays = _pad(rows, max_length, tokenizer.pad_id)
    arrays["labels"] = np.asarray([e["label"] for e in examples], np.int32)
    return arrays


def encode_lm(examples, tokenizer, family: str, max_length: int):
    """Token sequences for next-token prediction; `loss_mask` marks tokens that are predicted."""
    head, _ = tokenizer.specials(family)
    rows = [(head + tokenizer.encode(e["text"]) + [tokenizer.eos_id])[:max_length] for e in examples]
    arrays = _pad(rows, max_length, tokenizer.pad_id)
    arrays["loss_mask"] = arrays["attention_mask"].copy()
    arrays["loss_mask"][:, 0] = 0
    return arrays


def encode_generate(examples, template: Template, tokenizer, family: str, max_length: int):
    """Prompt = the template around the input, target = the output then EOS; only target
    tokens are predicted (`loss_mask`). The input is truncated first, then the output."""
    before, after = template.parts()
    head, _ = tokenizer.specials(family)
    rows, targets = [], []
    for e in examples:
        output = (tokenizer.encode(e["output"]) + [tokenizer.eos_id])[: max_length // 2]
        fixed = head + tokenizer.encode(before)
        tail = tokenizer.encode(after)
        budget = max(max_length - len(fixed) - len(tail) - len(output), 0)
        prompt = (fixed + tokenizer.encode(e["input"])[:budget] + tail)[: max_length - len(output)]
        rows.append(prompt + output)
        targets.append(len(prompt))
    arrays = _pad(rows, max_length, tokenizer.pad_id)
    arrays["loss_mask"] = arrays["attention_mask"] * (np.arange(max_length)[None] >= np.asarray(targets)[:, None])
    return arrays


def _pad(rows, length: int, pad_id: int):
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def batch_at(arrays, step: int, batch_size: int, seed: int):
    """The training batch for `step`: epoch e is a permutation seeded by (seed, e)."""
    n = len(next(iter(arrays.values())))
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    if len(idx) < batch_size:   # fewer examples than one batch: wrap around
        idx = np.resize(order, batch_size)
    return {k: v[idx] for k, v in arrays.items()}


def eval_batches(arrays, batch_size: int):
    """Consecutive batches in order; the last is padded by repeating rows, with `weight` 0."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        batch = {k: v[np.minimum(idx, n - 1)] for k, v in arrays.items()}
        batch["weight"] = (idx < n).astype(np.float32)
        yield batch
