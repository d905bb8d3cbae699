"""Packed rows (segment ids in `attention_mask`) compute what their examples compute alone: the same
logits and per-example losses, with and without sites that touch attention and positions; and 0/1
masks keep the positions and visibility they had before packing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import methods, models, partition
from ptune.data.packing import pack
from ptune.models.layers import segment_positions, visible_mask
from ptune.training import objectives

MAX_LENGTH = 12
LENGTHS = [6, 3, 9, 4, 2, 5]          # first-fit decreasing: 3 rows, two of them full
METHODS = {"plain": None, "prompt": {"length": 4}, "prefix": {"length": 3, "hidden": 16},
           "ptuning_v2": {"length": 3}, "lora": {"rank": 4}}


def examples():
    """Unpadded rows with lm-style (first token 0) and generate-style (prompt 0) loss masks."""
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(LENGTHS):
        predicted_from = 1 if i % 2 else n // 2
        rows.append({"input_ids": rng.integers(1, 250, n).tolist(),
                     "loss_mask": [int(t >= predicted_from) for t in range(n)]})
    return rows


def shift(x):
    """What objectives.loss does: position t is weighed by (and predicts) entry t + 1."""
    return jnp.pad(x[:, 1:], [(0, 0), (0, 1)])


@functools.cache
def model_and_params(preset, method_name):
    """The model with its method's sites and random weights everywhere, sites included, so that
    every site changes the outputs (LoRA's B, for one, starts at 0 in training)."""
    cfg = models.model_config(preset)
    options = METHODS[method_name]
    model = models.build(cfg, methods.get(method_name, cfg, **options).sites if options else models.Sites())
    rng = np.random.default_rng(0)

    def leaf(keypath, shape):
        mean = 1.0 if partition.path_str(keypath).endswith("scale") else 0.0   # norms' scales near 1
        return jnp.asarray(mean + 0.05 * rng.standard_normal(shape.shape), shape.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, nn.unbox(models.abstract_params(model)))


@functools.cache
def forward(model):
    """jit((params, batch, weights (K, B, T)) -> (logits (B, T, V), K NLL sums)): each NLL sum is the
    model's fused loss with objectives.loss's targets, weighed by one of the K weights."""
    def run(params, batch, weights):
        apply = functools.partial(model.apply, {"params": params}, batch["input_ids"], batch["attention_mask"])
        nll = jax.vmap(lambda w: apply(output="nll_sum", targets=(shift(batch["input_ids"]), w)))(weights)
        return apply(output="logits"), nll
    return jax.jit(run)


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_packed_rows_match_examples_alone(preset, method_name):
    model, params = model_and_params(preset, method_name)
    rows = examples()
    packed = pack(rows, MAX_LENGTH, pad_id=0)
    assert len(packed["input_ids"]) < len(rows)
    alone = pack_alone(rows)
    segments = packed["attention_mask"]
    in_example = [(np.arange(len(segments))[:, None] == r) & (segments == s) for r, s in locate(packed, rows)]
    # Example k's weights: its own loss mask, shifted onto the positions that predict its tokens.
    packed_weights = jnp.stack([shift(packed["loss_mask"] * m) for m in in_example])
    alone_weights = jnp.stack([shift(alone["loss_mask"] * (np.arange(len(rows)) == k)[:, None])
                               for k in range(len(rows))])
    packed_logits, packed_nll = forward(model)(params, packed, packed_weights)
    alone_logits, alone_nll = forward(model)(params, alone, alone_weights)
    assert np.all(np.asarray(alone_nll) > 0)
    np.testing.assert_allclose(packed_nll, alone_nll, rtol=1e-5, atol=1e-5)
    for k, m in enumerate(in_example):
        np.testing.assert_allclose(packed_logits[m], alone_logits[k, :LENGTHS[k]], rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradient_are_the_sums_of_the_examples():
    """objectives.loss, unchanged, trains a packed batch on exactly its examples' losses: no position
    predicts the next example's first token (its loss_mask is 0)."""
    model, params = model_and_params("llama-tiny", "lora")
    method = methods.get("lora", model.config, **METHODS["lora"])
    trainable, frozen = partition.split(params, method.labels(params))
    rows = examples()

    def loss_sum(trained, batch):
        metrics = objectives.loss(model, partition.merge(trained, frozen), batch, "lm")[1]
        return metrics["loss_sum"], metrics["count"]

    step = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))
    # The unpacked batch's loss and gradient are the sums of its rows', each example's alone.
    (packed_loss, packed_count), packed = step(trainable, pack(rows, MAX_LENGTH, 0))
    (alone_loss, alone_count), alone = step(trainable, pack_alone(rows))
    assert packed_count == alone_count == sum(sum(row["loss_mask"]) for row in rows)
    np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
    for path, g in partition.flatten(alone).items():
        assert np.abs(g).max() > 0, path
        np.testing.assert_allclose(partition.flatten(packed)[path], g, rtol=1e-4, atol=1e-6, err_msg=path)


def old_visible_mask(kv_mask, q_slots, causal, prefix_len):
    """visible_mask before packing, for 0/1 masks."""
    visible = kv_mask[:, None, :].astype(bool)
    if causal:
        visible = visible & (np.arange(kv_mask.shape[1])[None, None, :] <= q_slots[:, :, None])
    return np.concatenate([np.ones(visible.shape[:2] + (prefix_len,), bool), visible], -1)[:, None]


def random_01_masks(rng, shape=(64, 10)):
    """Left-padded, right-padded and holed 0/1 masks (all-padding rows too)."""
    lengths = rng.integers(0, shape[1] + 1, shape[0])
    right = (np.arange(shape[1]) < lengths[:, None]).astype(np.int32)
    return np.concatenate([right, right[:, ::-1], rng.integers(0, 2, shape).astype(np.int32)])


def test_01_masks_keep_their_positions_and_visibility():
    rng = np.random.default_rng(0)
    masks = random_01_masks(rng)
    np.testing.assert_array_equal(segment_positions(masks), np.maximum(np.cumsum(masks, 1) - 1, 0))
    B, S = masks.shape
    for causal in (True, False):
        for prefix_len, shared in ((0, 0), (3, 2)):   # a soft prompt is a run of 1s leading the mask
            kv_mask = np.concatenate([np.ones((B, shared), np.int32), masks], 1)
            for q_slots in (np.arange(S + shared), np.arange(4) + 5):   # a whole pass; decode steps
                q_slots = np.broadcast_to(q_slots, (B, len(q_slots)))
                new = visible_mask(kv_mask, q_slots, causal, prefix_len, shared)
                np.testing.assert_array_equal(new, np.broadcast_to(old_visible_mask(kv_mask, q_slots, causal,
                                                                                    prefix_len), new.shape))


def test_segments_restart_positions_and_see_only_themselves():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 0]])
    kv_mask = np.concatenate([np.ones((1, 2), np.int32), segments], 1)    # two soft-prompt slots first
    visible = np.asarray(visible_mask(kv_mask, np.arange(10)[None], True, prefix_len=1, shared=2))[0, 0]
    expected = np.tril(np.ones((10, 10), bool))
    for segment in (1, 2, 3):   # a token sees the prompt and its own example, nothing of the others
        expected[2 + np.flatnonzero(segments[0] == segment), 2:] &= segments[0] == segment
    expected[:, 8:] = False   # nobody sees padding keys; padding queries still see every real key
    np.testing.assert_array_equal(visible[:, 1:], expected)
    assert visible[:, 0].all()   # the prefix


def pack_alone(rows):
    """One example per row, right-padded: the unpacked batch, with 0/1 masks."""
    arrays = {k: [] for k in ("input_ids", "attention_mask", "loss_mask")}
    for row in rows:
        one = pack([row], MAX_LENGTH, 0)
        for k in arrays:
            arrays[k].append(one[k][0])
    return {k: np.stack(v) for k, v in arrays.items()}


def locate(packed, rows):
    """(packed row, segment id) of each example, found by its tokens."""
    return [next((r, s) for r, segments in enumerate(packed["attention_mask"]) for s in range(1, segments.max() + 1)
                 if packed["input_ids"][r][segments == s].tolist() == row["input_ids"]) for row in rows]
