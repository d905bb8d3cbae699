"""The flow every model family shares: inputs -> (prompt, positions, masks) -> blocks -> outputs.

A family module supplies its embeddings, blocks and final norm; `prepare` and
`outputs` do the rest, so soft prompts, prefixes, the KV cache and the output
heads behave identically in every family.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptune.errors import UserError
from ptune.models.layers import Linear, contract, param, segment_positions, visible_mask
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

OUTPUTS = ("hidden", "logits", "last_logits", "class", "nll_sum")


class Prepared(NamedTuple):
    x: jnp.ndarray               # (B, P+T, d) token embeddings, soft prompt first
    positions: jnp.ndarray       # (B, P+T) position ids
    mask: jnp.ndarray            # (B, P+T) this call's segment ids: 0 padding, >= 1 real (the prompt's 1)
    visible: jnp.ndarray         # (B, 1, P+T, prefix+S) which keys each query sees
    prefix: jnp.ndarray | None   # (layers, 2, prefix, kv_heads, head_dim)
    cache_index: jnp.ndarray | None
    n_prompt: int


def prepare(model: nn.Module, tok, attention_mask, positions, *, decode: bool, with_prompt: bool,
            causal: bool) -> Prepared:
    """Prepend the soft prompt and build positions and attention visibility.

    `attention_mask` holds segment ids: 0 padding, k >= 1 the k-th example packed in the row
    (0/1 unpacked). Positions count each segment's tokens from 0 and are shifted past the prompt
    and prefix (which sit before the text, as in HF PEFT); a token sees only its own segment, the
    prompt and the prefix, so each packed example is computed as if it were alone. In decode mode
    `attention_mask` covers every cache slot of the text (B, max_len), `positions`
    must be given, and the prompt is prepended only when `with_prompt` (prefill).
    """
    cfg, sites = model.config, model.sites
    B, T = tok.shape[:2]
    n_prompt, n_prefix = sites.input_tokens, sites.kv_tokens
    attention_mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    if positions is None:
        if decode and not model.is_initializing():
            raise UserError("decode mode needs explicit positions (see ptune.inference.generate)")
        positions = segment_positions(attention_mask[:, :T])
    positions = positions + n_prompt + n_prefix
    kv_mask = jnp.concatenate([jnp.ones((B, n_prompt), attention_mask.dtype), attention_mask], 1)
    this_mask = attention_mask[:, :T]
    if n_prompt and with_prompt:
        prompt = sites.input_embeddings(cfg).astype(tok.dtype)
        tok = jnp.concatenate([jnp.broadcast_to(prompt, (B,) + prompt.shape), tok], 1)
        prompt_pos = jnp.broadcast_to(jnp.arange(n_prompt) + n_prefix, (B, n_prompt))
        positions = jnp.concatenate([prompt_pos, positions], 1)
        this_mask = jnp.concatenate([jnp.ones((B, n_prompt), this_mask.dtype), this_mask], 1)
    L = tok.shape[1]
    cache_index = None
    if decode:
        index = model.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        cache_index = index.value
        q_slots = cache_index + jnp.arange(L)
        if not model.is_initializing():   # this call's tokens sit at slots index .. index + L
            this_mask = jax.lax.dynamic_slice_in_dim(kv_mask, cache_index, L, axis=1)
        if not model.is_initializing():
            index.value = cache_index + L
    else:
        q_slots, kv_mask = jnp.arange(L), this_mask
    q_slots = jnp.broadcast_to(q_slots, (B, L))
    prefix = sites.layer_kv(cfg)
    shared = kv_mask.shape[1] - attention_mask.shape[1]   # the soft prompt's slots lead kv_mask
    visible = visible_mask(kv_mask, q_slots, causal, n_prefix, shared, cfg.sliding_window)
    prepended = n_prompt if with_prompt else 0
    return Prepared(tok, positions, this_mask, visible, prefix, cache_index, prepended)


def outputs(model: nn.Module, h, mask, n_prompt: int, output: str, lm_head=None, pool=None, targets=None):
    """Drop the prompt positions and compute the requested output.

    hidden: (B,T,d); logits: (B,T,V); last_logits: (B,V) at the last real token;
    class: (B,num_labels) from the task head on the pooled (or last-token) state;
    nll_sum: sum of weight * -log p(target) over positions, `targets` = (ids, weights), both (B,T)
    (see `nll_sum`). `lm_head` is (module, fn): the logits are fn(module, h).
    """
    if output not in OUTPUTS:
        raise UserError(f"output={output!r}; choose one of {OUTPUTS}")
    cfg = model.config
    if output == "class" and not cfg.num_labels:
        raise UserError("output='class' needs a task head: set model.num_labels > 0")
    pooled = pool(h) if pool else None
    h, mask = h[:, n_prompt:], mask[:, n_prompt:]
    last = jnp.take_along_axis(h, last_token(mask)[:, None, None], axis=1)[:, 0]
    class_logits = lambda: ClassHead(cfg.num_labels, cfg.head_bias, name=cfg.head_name)(
        last if pooled is None else pooled)
    if model.is_initializing():
        # Create every head's parameters, whatever output init was asked for.
        if lm_head:
            lm_head[1](lm_head[0], last)
        if cfg.num_labels and output != "class":
            class_logits()
    if output == "hidden":
        return h
    if output == "class":
        return class_logits()
    if lm_head is None:
        raise UserError(f"{type(model).__name__} has no language-model head for output={output!r}")
    if output == "nll_sum":
        if targets is None:
            raise UserError("output='nll_sum' needs targets=(ids, weights), both (B, T)")
        module, fn = lm_head
        logits_fn = lambda variables, x: module.clone(parent=None).apply(variables, x, method=fn)
        return nll_sum(logits_fn, {"params": module.variables["params"]}, h, *targets)
    return lm_head[1](lm_head[0], h if output == "logits" else last)


def nll_sum(logits_fn, head_vars, h, ids, weights, chunk_tokens: int = 256, max_chunks: int = 16):
    """sum(weights * -log softmax(logits_fn(head_vars, h))[ids]) without the (B, T, vocab) logits.

    Fused linear cross-entropy: the positions are cut into chunks along T (the batch axis stays
    whole, so a data-parallel sharding is untouched) and a scan makes each chunk's logits, reduces
    them to its loss and, when differentiated, turns them into the head's and `h`'s gradients in
    the forward pass; the backward pass only scales those. With a 50k vocabulary the logits were
    the step's largest buffers; now one chunk's exist at a time and none is kept or recomputed.
    Head leaves that are not differentiated (a frozen tied embedding) get no gradient work.
    """
    B, T = ids.shape
    n = min(max_chunks, max(1, B * T // chunk_tokens), T)
    size = -(-T // n)
    # (B, T, ...) -> (n, B, size, ...), padding weighing 0.
    chunks = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, n * size - T)] + [(0, 0)] * (x.ndim - 2)).reshape(
        (B, n, size) + x.shape[2:]), 1, 0)
    xs = (chunks(ids), chunks(weights.astype(jnp.float32)))

    def chunk_loss(logits, ids, weights):
        """(softmax, weighted NLL sum) of one chunk's logits. The softmax reuses the log-sum-exp's
        exponentials: a second exp pass over the vocabulary (and XLA:CPU's slower fused
        exp-reduce of `jax.nn.logsumexp`) cost 0.09 s of a 2.2 s GPT-2 LoRA f32 step."""
        logits = logits.astype(jnp.float32)
        top = logits.max(-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = e.sum(-1, keepdims=True)
        lse = (top + jnp.log(total))[..., 0]
        picked = jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
        return e / total, ((lse - picked) * weights).sum()

    static = {}

    @jax.custom_vjp
    def fused(head_vars, hs):
        step = lambda total, x: (total + chunk_loss(logits_fn(head_vars, x[0]), *x[1:])[1], None)
        return jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs,) + xs)[0]

    def forward(head_vars, hs):
        leaves, treedef = jax.tree.flatten(head_vars)
        trained = [i for i, leaf in enumerate(leaves) if leaf.perturbed]
        values = [leaf.value for leaf in leaves]

        def logits_of(trained_values, h):
            full = list(values)
            for i, v in zip(trained, trained_values):
                full[i] = v
            return logits_fn(jax.tree.unflatten(treedef, full), h)

        def step(carry, x):
            total, grads = carry
            h, ids, weights = x
            out, vjp = jax.vjp(logits_of, [values[i] for i in trained], h)
            probs, loss = chunk_loss(out, ids, weights)
            g = (probs - jax.nn.one_hot(ids, probs.shape[-1])) * weights[..., None]
            head_g, h_g = vjp(g.astype(out.dtype))
            return (total + loss, [a + b for a, b in zip(grads, head_g)]), h_g
        zeros = [jnp.zeros_like(values[i]) for i in trained]
        (total, grads), h_grads = jax.lax.scan(step, (jnp.zeros((), jnp.float32), zeros), (hs.value,) + xs)
        static.update(treedef=treedef, count=len(leaves), trained=trained)   # not JAX values: no residuals
        return total, (grads, h_grads)

    def backward(residuals, g):
        grads, h_grads = residuals
        out = [None] * static["count"]
        for i, grad in zip(static["trained"], grads):
            out[i] = grad * g.astype(grad.dtype)
        return jax.tree.unflatten(static["treedef"], out), h_grads * g.astype(h_grads.dtype)

    fused.defvjp(forward, backward, symbolic_zeros=True)
    return fused(head_vars, chunks(h))


class Model(nn.Module):
    """The top level of every family: its body under the HF name, then the shared heads.

    A family sets `body` (a module with `embed(ids)`, `__call__(prepared, deterministic)`,
    `token_embedding`, the nn.Embed a tied LM head attends with, and optionally a `pooler`)
    and `body_name`.
    """
    config: ModelConfig
    sites: Sites = Sites()
    body: ClassVar[type]
    body_name: ClassVar[str]

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, *, output: str | None = None,
                 decode: bool = False, with_prompt: bool = True, deterministic: bool = True, targets=None):
        """input_ids: (B,T) -> `output` ("logits" for decoders, "class" for encoders by default;
        see `outputs`, which takes `targets`). decode: use and update the KV cache (see `prepare`)."""
        cfg = self.config
        if decode and not cfg.causal:
            raise UserError(f"the {cfg.family} family is an encoder: it has no decode mode")
        body = self.body(cfg, self.sites, name=self.body_name)
        p = prepare(self, body.embed(input_ids), attention_mask, positions, decode=decode,
                    with_prompt=with_prompt, causal=cfg.causal)
        h = body(p, deterministic)
        lm_head = None
        if cfg.causal:   # logits in the compute dtype; the losses cast them to float32
            lm_head = (body.token_embedding, tied_logits) if cfg.tie_embeddings else (Linear(
                cfg.vocab_size, ("embed", "vocab"), False, self.sites, dtype=cfg.compute_dtype, name="lm_head"),
                Linear.__call__)
        output = output or ("logits" if cfg.causal else "class")
        return outputs(self, h, p.mask, p.n_prompt, output, lm_head, getattr(body, "pooler", None), targets)


def tied_logits(embed: nn.Embed, x):
    """The tied LM head: x @ embedding^T in the embedding's compute dtype (nn.Embed.attend, with
    `contract`'s float32 accumulation)."""
    return contract("...d,vd->...v", x, embed.embedding, embed.dtype).astype(embed.dtype)


class ClassHead(nn.Module):
    """The task head (HF: `classifier` for encoders, `score` for decoders).

    Always float32: it is tiny, and its logits go straight into the loss."""
    num_labels: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        y = x.astype(jnp.float32) @ param(self, "kernel", nn.initializers.normal(0.02),
                                          (x.shape[-1], self.num_labels), ("embed", None))
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.num_labels,), (None,))
        return y


def remat(block: type[nn.Module], config: ModelConfig) -> type[nn.Module]:
    """`block`, recomputed in the backward pass as `config.remat` says; parameter paths do not change.

    Every family's block is called as block(x, prepared, layer, deterministic): `layer` and
    `deterministic` are Python values, so they are static (Flax counts `self` as argument 0).
    """
    if config.remat == "none":
        return block
    policy = None if config.remat == "full" else getattr(jax.checkpoint_policies, config.remat)
    return nn.remat(block, policy=policy, static_argnums=(3, 4))


def last_token(mask):
    """Index of the last real token per row (works for left and right padding). mask: (B,T)."""
    return jnp.argmax(jnp.where(mask > 0, jnp.arange(mask.shape[1]), -1), axis=1)
