"""pack(): every example once, within max_length, under its own segment id, loss mask kept."""

import numpy as np
import pytest

from ptune.data.packing import pack, padding_fraction

MAX_LENGTH = 16


def random_rows(n=200, seed=0):
    """Examples of 1..MAX_LENGTH tokens; the first token never predicted, as every encoder makes it."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in rng.integers(1, MAX_LENGTH + 1, n):
        ids = rng.integers(1, 1000, length).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] + rng.integers(0, 2, length - 1).tolist()})
    return rows


def unpack(arrays):
    """[(input_ids, loss_mask)] of every segment of every row, in row and segment order."""
    out = []
    for ids, segments, loss in zip(arrays["input_ids"], arrays["attention_mask"], arrays["loss_mask"]):
        for segment in range(1, segments.max() + 1):
            out.append((ids[segments == segment].tolist(), loss[segments == segment].tolist()))
    return out


def test_every_example_appears_once_intact_within_max_length():
    rows = random_rows()
    arrays = pack(rows, MAX_LENGTH, pad_id=-1)
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        k: ((len(arrays["input_ids"]), MAX_LENGTH), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    expected = sorted((r["input_ids"], r["loss_mask"]) for r in rows)
    assert sorted(unpack(arrays)) == expected
    segments = arrays["attention_mask"]
    # Each row: segments 1..k laid out contiguously from slot 0 in order, then padding only.
    for row_segments in segments:
        real = row_segments[row_segments > 0]
        assert np.all(np.diff(row_segments[:len(real)]) >= 0) and real[0] == 1
        assert set(real) == set(range(1, real.max() + 1))
        assert not np.any(row_segments[len(real):])
    assert np.all((arrays["input_ids"] == -1) == (segments == 0))
    assert not np.any(arrays["loss_mask"][segments == 0])


def test_no_weighed_position_predicts_another_example():
    """The LM loss weighs position t by loss_mask[t + 1] (predicting token t + 1): within a segment only."""
    arrays = pack(random_rows(), MAX_LENGTH, 0)
    segments, loss = arrays["attention_mask"], arrays["loss_mask"]
    weighed = loss[:, 1:] > 0
    assert np.all(segments[:, :-1][weighed] == segments[:, 1:][weighed])
    assert weighed.sum() == sum(sum(r["loss_mask"]) for r in random_rows())


def test_first_fit_decreasing_fills_rows_and_is_deterministic():
    rows = [{"input_ids": [i] * n, "loss_mask": [0] * n} for i, n in enumerate([5, 9, 2, 7, 3, 4, 1, 1])]
    arrays = pack(rows, 10, 0)
    # 9+1, 7+3, 5+4+1, 2: the examples in each row in their given order.
    assert arrays["input_ids"].tolist() == [[1] * 9 + [6],
                                             [3] * 7 + [4] * 3,
                                             [0] * 5 + [5] * 4 + [7],
                                             [2] * 2 + [0] * 8]
    assert arrays["attention_mask"][2].tolist() == [1] * 5 + [2] * 4 + [3]
    assert padding_fraction(arrays) == 8 / 40
    again = pack([dict(r) for r in rows], 10, 0)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_padding_fraction_counts_pad_slots():
    rows = random_rows()
    arrays = pack(rows, MAX_LENGTH, 0)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert padding_fraction(arrays) == pytest.approx(1 - tokens / arrays["attention_mask"].size)
    assert padding_fraction(arrays) < 0.05   # 200 random lengths leave little room unfilled
    assert padding_fraction({"attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0]])}) == 5 / 8


@pytest.mark.parametrize("bad,message", [({"input_ids": [], "loss_mask": []}, "example 1 has 0 tokens"),
                                         ({"input_ids": [1] * 17, "loss_mask": [0] * 17}, "example 1 has 17"),
                                         ({"input_ids": [1, 2], "loss_mask": [0]}, "2 input_ids but 1 loss_mask")])
def test_bad_rows_are_refused_naming_the_example(bad, message):
    with pytest.raises(ValueError, match=message):
        pack([{"input_ids": [1], "loss_mask": [0]}, bad], MAX_LENGTH, 0)
