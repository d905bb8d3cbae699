"""Decoding through the KV cache as the cached-parity tests drive it: a prefill, then one token a call."""

import functools

import jax
import numpy as np

from ptune import models


def cached_logits(model, params, ids, mask, positions, prefill: int):
    """(the logits of every position, the final cache): the first `prefill` tokens in one call (the soft
    prompt prepended), then one token per call; `mask` always covers every cache slot."""
    decode = jax.jit(functools.partial(model.apply, output="logits", decode=True, mutable=["cache"]),
                     static_argnames="with_prompt")
    logits, state = decode({"params": params, "cache": models.init_cache(model, *ids.shape)},
                           ids[:, :prefill], mask, positions[:, :prefill], with_prompt=True)
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, state = decode({"params": params, "cache": state["cache"]}, ids[:, t:t + 1], mask,
                               positions[:, t:t + 1], with_prompt=False)
        steps.append(logits)
    return np.concatenate(steps, 1), state["cache"]
