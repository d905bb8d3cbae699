"""The language-model loss: fused, chunked linear cross-entropy against the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_precision import tiny, variant

from ptune.models.common import nll_sum
from ptune.training import objectives


def plain_loss(model, params, batch):
    """Mean next-token cross-entropy from the whole (B, T, vocab) logits."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], output="logits")
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                                 batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:]
    return (token_loss * mask).sum() / mask.sum()


def max_rel_error(a, b):
    """Largest leaf-wise |a - b| / max|b|; a leaf that is zero in `b` (an unused head) must be zero in `a`."""
    return max(float(jnp.max(jnp.abs(x - y)) / max(float(jnp.max(jnp.abs(y))), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("tied", [True, False])
def test_lm_loss_and_gradients_match_the_plain_logits(preset, tied):
    model, params, batch, _ = tiny(preset)
    model = variant(model, tie_embeddings=tied, dropout=0.0)
    if not tied:   # an lm_head kernel, drawn like the other weights
        params = dict(params, lm_head={"kernel": 0.05 * np.random.default_rng(1).standard_normal(
            (model.config.hidden_size, model.config.vocab_size)).astype(np.float32)})
    fused = jax.jit(jax.value_and_grad(lambda p: objectives.loss(model, p, batch, "lm")[0]))(params)
    plain = jax.jit(jax.value_and_grad(lambda p: plain_loss(model, p, batch)))(params)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    assert max_rel_error(fused[1], plain[1]) < 1e-5


@pytest.mark.parametrize("head_trains", [True, False])
def test_nll_sum_over_chunks_with_padding(head_trains):
    """13 positions in chunks of 3 (the last one padded), weights zeroing some positions; the head
    frozen or not: value and gradients equal the one-piece formula's."""
    rng = np.random.default_rng(0)
    B, T, d, V = 4, 13, 8, 50
    head = {"w": jnp.asarray(rng.standard_normal((d, V)), jnp.float32)}
    h = jnp.asarray(rng.standard_normal((B, T, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (B, T)))
    weights = jnp.asarray(rng.integers(0, 3, (B, T)), jnp.float32)
    logits_fn = lambda v, x: x @ v["w"]

    def plain(head, h):
        return (optax.softmax_cross_entropy_with_integer_labels(logits_fn(head, h), ids) * weights).sum()

    def fused(head, h):
        return nll_sum(logits_fn, head, h, ids, weights, chunk_tokens=8)

    argnums = (0, 1) if head_trains else 1
    got, want = (jax.jit(jax.value_and_grad(f, argnums))(head, h) for f in (fused, plain))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert max_rel_error(got[1], want[1]) < 1e-5
    np.testing.assert_allclose(jax.jit(fused)(head, h), want[0], rtol=1e-6)   # undifferentiated: the scan alone
