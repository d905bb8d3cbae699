"""Losses and predictions for each task objective.

    lm          next-token cross-entropy over `loss_mask`, fused with
                the LM head so the vocab-wide logits are never whole   (decoders)
    verbalizer  classify by the LM's next-token logits restricted to
                the verbalizer's first tokens, after the template     (decoders)
    head        classify with the task head (`classifier`/`score`)    (all families)
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

OBJECTIVES = ("lm", "verbalizer", "head")


def _apply(model, params, batch, output: str, rng, deterministic: bool, targets=None):
    extra = {} if targets is None else {"targets": targets}
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], output=output,
                       deterministic=deterministic, rngs={"dropout": rng} if rng is not None else None, **extra)


def class_logits(model, params, batch, objective: str, label_ids=None, rng=None, deterministic=True):
    """(B, num_classes) logits for a classification batch."""
    if objective == "head":
        return _apply(model, params, batch, "class", rng, deterministic)
    logits = _apply(model, params, batch, "last_logits", rng, deterministic)
    return logits[:, jnp.asarray(label_ids)].astype(jnp.float32)


def loss(model, params, batch, objective: str, label_ids=None, rng=None, deterministic=True):
    """(mean loss, metrics) with per-example `weight` (1 when absent); metrics are weighted sums."""
    weight = batch.get("weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))
    if objective == "lm":   # position t predicts token t + 1; the last position predicts nothing
        shift = lambda x: jnp.pad(x[:, 1:], [(0, 0), (0, 1)])
        mask = shift(batch["loss_mask"]) * weight[:, None]
        total = _apply(model, params, batch, "nll_sum", rng, deterministic, (shift(batch["input_ids"]), mask))
        tokens = mask.sum()
        return total / jnp.maximum(tokens, 1), {"loss_sum": total, "count": tokens}
    logits = class_logits(model, params, batch, objective, label_ids, rng, deterministic)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]) * weight
    count = weight.sum()
    total = (per_example * weight).sum()
    return total / jnp.maximum(count, 1), {"loss_sum": total, "correct": correct.sum(), "count": count}


def finalize(sums: dict) -> dict:
    """Weighted sums over batches -> loss, accuracy or perplexity, and the count they average over
    (examples, or predicted tokens)."""
    out = {"loss": float(sums["loss_sum"] / max(sums["count"], 1))}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"] / max(sums["count"], 1))
    else:
        out["perplexity"] = float(jnp.exp(out["loss"]))
    out["count"] = round(float(sums["count"]))
    return out


def accumulate(sums: dict, metrics: dict) -> dict:
    """Running sums, kept on the device: adding does not wait for the step to finish."""
    return {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
