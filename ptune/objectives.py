"""Losses and predictions for each task objective.

    lm          next-token cross-entropy over `loss_mask`           (decoders)
    verbalizer  classify by the LM's next-token logits restricted to
                the verbalizer's first tokens, after the template     (decoders)
    head        classify with the task head (`classifier`/`score`)    (all families)
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

OBJECTIVES = ("lm", "verbalizer", "head")


def _apply(model, params, batch, output: str, rng, deterministic: bool):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], output=output,
                       deterministic=deterministic, rngs={"dropout": rng} if rng is not None else None)


def class_logits(model, params, batch, objective: str, label_ids=None, rng=None, deterministic=True):
    """(B, num_classes) logits for a classification batch."""
    if objective == "head":
        return _apply(model, params, batch, "class", rng, deterministic)
    logits = _apply(model, params, batch, "last_logits", rng, deterministic)
    return logits[:, jnp.asarray(label_ids)].astype(jnp.float32)


def loss(model, params, batch, objective: str, label_ids=None, rng=None, deterministic=True):
    """(mean loss, metrics) with per-example `weight` (1 when absent); metrics are weighted sums."""
    weight = batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))
    if objective == "lm":
        logits = _apply(model, params, batch, "logits", rng, deterministic)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:])
        mask = batch["loss_mask"][:, 1:] * weight[:, None]
        tokens = mask.sum()
        total = (token_loss * mask).sum()
        return total / jnp.maximum(tokens, 1), {"loss_sum": total, "count": tokens}
    logits = class_logits(model, params, batch, objective, label_ids, rng, deterministic)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]) * weight
    count = weight.sum()
    total = (per_example * weight).sum()
    return total / jnp.maximum(count, 1), {"loss_sum": total, "correct": correct.sum(), "count": count}


def finalize(sums: dict) -> dict:
    """Weighted sums over batches -> loss, accuracy or perplexity."""
    out = {"loss": float(sums["loss_sum"] / max(sums["count"], 1))}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"] / max(sums["count"], 1))
    else:
        out["perplexity"] = float(jnp.exp(out["loss"]))
    return out


def accumulate(sums: dict, metrics: dict) -> dict:
    """Running sums, kept on the device: adding does not wait for the step to finish."""
    return {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
