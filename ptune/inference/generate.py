"""Autoregressive generation with a jitted KV cache, for every method's sites.

Prompts are left-padded so that they all end at the same cache slot; the soft prompt
(if any) is prepended once, at prefill. Greedy when temperature == 0, else sampling
with optional top-k and top-p (nucleus) filtering.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ptune import models
from ptune.errors import UserError
from ptune.models.layers import segment_positions


def left_pad(prompts: list[list[int]], pad_id: int):
    """(ids, mask): (B, T) int32 arrays with every prompt right-aligned."""
    if not prompts:
        raise UserError("generate: no prompts; give a list of prompts, each a list of token ids")
    length = max(len(p) for p in prompts)
    if not length:
        raise UserError("generate: every prompt is empty; give at least one token")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if p:
            ids[i, -len(p):], mask[i, -len(p):] = p, 1
    return ids, mask


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0:
        return jnp.argmax(logits, -1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.sort(logits, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(order, -1), -1)
        # the smallest set whose probability reaches top_p: keep tokens above the cut-off logit
        cutoff = jnp.take_along_axis(order, jnp.sum(cum < top_p, -1, keepdims=True), -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits)


def decode(model, params, ids, mask, rng, eos_id, pad_id, *, max_new_tokens, temperature, top_k, top_p):
    """(B, max_new_tokens) ids from left-padded `ids`, `mask` (B, T); traceable, so callers may
    jit or vmap it (the adapter bank vmaps it over examples that each carry their own adapter)."""
    B, T = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), mask.dtype)], 1)
    positions = segment_positions(full_mask)
    cache = models.init_cache(model, B, T + max_new_tokens)
    logits, state = model.apply({"params": params, "cache": cache}, ids, full_mask, positions[:, :T],
                                output="logits", decode=True, with_prompt=True, mutable=["cache"])

    def step(carry, i):
        cache, logits, done, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_logits(logits, key, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        out, state = model.apply({"params": params, "cache": cache}, token[:, None], full_mask,
                                 jax.lax.dynamic_slice_in_dim(positions, T + i, 1, 1), output="logits",
                                 decode=True, with_prompt=False, mutable=["cache"])
        return (state["cache"], out[:, -1], done, rng), token

    init = (state["cache"], logits[:, -1], jnp.zeros(B, bool), rng)
    _, tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    return tokens.T


_generate = jax.jit(decode, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))


def request(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0):
    """Validate a generation request for `model`; returns the left-padded (ids, mask)."""
    if not model.config.causal:
        raise UserError(f"generate needs a causal model; {model.config.family} is an encoder")
    vocab, integer = model.config.vocab_size, lambda v: isinstance(v, numbers.Integral)
    checks = {"max_new_tokens": (max_new_tokens, lambda v: integer(v) and v > 0, "an integer > 0"),
              "temperature": (temperature, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
              "top_k": (top_k, lambda v: integer(v) and 0 <= v <= vocab, f"an integer in [0, {vocab}] (0: all)"),
              "top_p": (top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")}
    for name, (value, ok, wanted) in checks.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and ok(value)):
            raise UserError(f"generate: {name}={value!r} must be {wanted}")
    is_list = lambda x: isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, str)
    if not is_list(prompts):
        raise UserError(f"generate: prompts={prompts!r:.80} must be a list of prompts, each a list of token ids")
    bad = next((i for i, p in enumerate(prompts)
                if not (is_list(p) and all(integer(t) and 0 <= t < vocab for t in p))), None)
    if bad is not None:
        raise UserError(f"generate: prompt {bad} is {prompts[bad]!r:.80}; each prompt must be a list of token ids "
                        f"in [0, {vocab}) (tokenizer.encode(text))")
    ids, mask = left_pad(prompts, pad_id)
    extra = model.sites.extra_positions
    if ids.shape[1] + max_new_tokens + extra > model.config.max_positions:
        raise UserError(f"generate: prompt {ids.shape[1]} + new {max_new_tokens} + prompt/prefix {extra} tokens "
                        f"exceed the model's context of {model.config.max_positions}; shorten the prompt or "
                        "max_new_tokens")
    return ids, mask


def generate(model, params, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int, pad_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng=None) -> np.ndarray:
    """(B, max_new_tokens) generated ids; after `eos_id` a row holds `pad_id`.

    `model` is any causal ptune model (its sites included); `params` its full tree,
    with a prefix folded or not.
    """
    ids, mask = request(model, prompts, max_new_tokens, pad_id, temperature, top_k, top_p)
    rng = jax.random.key(0) if rng is None else rng
    return np.asarray(_generate(model, params, ids, mask, rng, eos_id, pad_id, max_new_tokens=max_new_tokens,
                                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))
