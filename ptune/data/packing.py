"""Sequence packing: several encoded examples per row, told apart by segment ids.

The models read `attention_mask` as segment ids (0 = padding, k >= 1 = the row's k-th example):
a token attends only within its own example (plus a soft prompt or prefix), and positions restart
at each example, so a packed row computes what its examples would alone. The LM loss needs no
boundary handling: every encoder gives an example's first token loss_mask 0, and the loss at
position t is weighed by loss_mask[t + 1], so no position is trained to predict the next example.
"""

from __future__ import annotations

import numpy as np

from ptune.errors import UserError


def pack(rows: list[dict], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pack unpadded examples into rows of `max_length` by first-fit decreasing.

    rows: dicts {"input_ids", "loss_mask"}, lists of equal length 1..max_length.
    Returns {"input_ids" (pad_id after the last example), "attention_mask" (segment ids 1..k in
    each row, 0 for padding), "loss_mask"}: all (N, max_length) int32, N <= len(rows).

    Longest first, each example into the first row with room: fewer rows than first-fit in the
    given order. Ties keep the given order, and the examples within a row stay in it, so the
    result depends only on `rows` (a pure function: it may be applied chunk by chunk); the order
    in which rows are trained is left to the batcher's seeded shuffle.
    """
    lengths = np.array([len(row["input_ids"]) for row in rows], np.int64)
    for i, row in enumerate(rows):
        if not 1 <= lengths[i] <= max_length:
            raise UserError(f"pack: example {i} has {lengths[i]} tokens; each must have 1..{max_length} "
                            f"(truncate to max_length before packing)")
        if len(row["loss_mask"]) != lengths[i]:
            raise UserError(f"pack: example {i} has {lengths[i]} input_ids but {len(row['loss_mask'])} "
                            "loss_mask values")
    room = np.zeros(len(rows), np.int64)   # free slots of each packed row; at most one row per example
    members: list[list[int]] = []
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):   # stable: ties keep the given order
        fits = np.flatnonzero(room[:len(members)] >= lengths[i])
        if fits.size:
            members[fits[0]].append(i)
            room[fits[0]] -= lengths[i]
        else:
            members.append([i])
            room[len(members) - 1] = max_length - lengths[i]
    arrays = {"input_ids": np.full((len(members), max_length), pad_id, np.int32),
              "attention_mask": np.zeros((len(members), max_length), np.int32),
              "loss_mask": np.zeros((len(members), max_length), np.int32)}
    for r, examples in enumerate(members):
        start = 0
        for segment, i in enumerate(sorted(examples), 1):
            end = start + lengths[i]
            arrays["input_ids"][r, start:end] = rows[i]["input_ids"]
            arrays["attention_mask"][r, start:end] = segment
            arrays["loss_mask"][r, start:end] = rows[i]["loss_mask"]
            start = end
    return arrays


def padding_fraction(arrays: dict[str, np.ndarray]) -> float:
    """The share of slots that hold padding (attention_mask 0), packed or padded arrays alike."""
    return float(np.mean(np.asarray(arrays["attention_mask"]) == 0))
