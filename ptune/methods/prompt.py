"""Soft prompt tuning (Lester et al., 2021): L trainable embeddings prepended to the input.

Initialisation (Lester et al.'s options): `uniform` in [-0.5, 0.5]; `vocab`, embeddings of
tokens sampled from the 5,000 first ids; `text`, the embedding of `init_text` repeated to
length L; `labels`, the embeddings of the class-label words, then sampled vocabulary.
"""

import jax
import jax.numpy as jnp

from ptune import partition
from ptune.errors import UserError
from ptune.methods.base import InitContext, Method, positive_int
from ptune.models import WORD_EMBEDDINGS
from ptune.models.sites import Prompt, Sites

INITS = ("uniform", "vocab", "text", "labels")


def make(model_config, length: int = 20, init: str = "vocab", init_text: str | None = None) -> Method:
    positive_int("prompt", "length", length, model_config.max_positions, "(the model's context)")
    if init not in INITS:
        raise UserError(f"method prompt: init={init!r}; choose one of {INITS}")
    if (init == "text") != bool(init_text):
        raise UserError("method prompt: init='text' and init_text go together; give both or neither")
    if init_text is not None and not isinstance(init_text, str):
        raise UserError(f"method prompt: init_text={init_text!r} must be a string (the text whose embedding "
                        "starts the prompt)")
    initializer = None if init == "uniform" else lambda params, ctx: _initialize(params, ctx, init, init_text)
    return Method("prompt", Sites(prompt=Prompt(length)), rules=[(r"^prompt/", "prompt")], init=initializer)


def _initialize(params, ctx: InitContext, init: str, init_text: str | None):
    table = partition.flatten(params)[WORD_EMBEDDINGS[ctx.family]]
    length = params["prompt"]["embedding"].shape[0]
    ids = jax.random.randint(ctx.rng, (length,), 0, min(5000, table.shape[0]))
    if init in ("text", "labels"):
        if ctx.encode is None:
            raise UserError(f"method prompt: init={init!r} needs a tokenizer")
        words = [init_text] if init == "text" else list(ctx.label_words)
        if not words:
            raise UserError("method prompt: init='labels' needs a task with label words (a verbalizer)")
        given = [i for w in words for i in ctx.encode(w)]
        if init == "text":
            given = given * (length // max(len(given), 1) + 1)
        ids = jnp.asarray((given + list(ids.tolist()))[:length])
    prompt = {"embedding": jnp.asarray(table)[ids].astype(params["prompt"]["embedding"].dtype)}
    return {**params, "prompt": prompt}
