"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): L virtual-token embeddings prepended to the input,
as a soft prompt, produced during training by PEFT's `PromptEncoder` over L trainable input embeddings:

* "mlp": Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d);
* "lstm": a bidirectional LSTM (`layers` layers, h units per direction) - Linear(2h, 2h) - ReLU - Linear(2h, d).

`fold` evaluates the encoder once into the prompt itself, which is what PEFT saves (as `prompt_embeddings`,
peft_type P_TUNING) and reads at inference; the folded spec keeps the encoder's options for PEFT's config.
Leaves, in the training form: `ptuning/embedding` (L, d), `mlp_{i}/{kernel (in, out), bias}`, and for the
LSTM `lstm_{k}[_reverse]/{w_ih (in, 4h), w_hh (h, 4h), b_ih, b_hh}` (PyTorch's gates i, f, g, o, two biases
as it has, so the counts are PEFT's), all initialised as PyTorch does; folded: `ptuning/embedding` (L, d).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptune.errors import UserError
from ptune.models.ops import normal, param
from ptune.models.sites.base import one_length, register
from ptune.models.sites.prompt import PromptKind, SoftPrompt

ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass(frozen=True)
class PTuning:
    length: int
    encoder: str = "mlp"     # PEFT's encoder_reparameterization_type, lower case
    hidden: int = 128        # encoder_hidden_size
    layers: int = 2          # encoder_num_layers: the LSTM's (PEFT's MLP has three linear layers whatever it says)
    folded: bool = False     # True: `embedding` is the prompt itself (the encoder evaluated)


def _uniform(fan_in: int):
    """PyTorch's default init of nn.Linear and nn.LSTM parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _mlp(x, widths, names):
    """Linear layers to `widths` with ReLU between them (PyTorch's nn.Linear init)."""
    for i, (width, name) in enumerate(zip(widths, names)):
        init = _uniform(x.shape[-1])
        x = nn.Dense(width, kernel_init=init, bias_init=init, name=name)(x)
        x = nn.relu(x) if i < len(widths) - 1 else x
    return x


class LSTM(nn.Module):
    """One direction of one layer of PyTorch's nn.LSTM: a sequence (L, in) -> (L, hidden)."""
    hidden: int

    @nn.compact
    def __call__(self, x):
        h, init = self.hidden, _uniform(self.hidden)
        w_ih, w_hh = self.param("w_ih", init, (x.shape[-1], 4 * h)), self.param("w_hh", init, (h, 4 * h))
        bias = self.param("b_ih", init, (4 * h,)) + self.param("b_hh", init, (4 * h,))

        def step(state, x_gates):
            h_prev, c_prev = state
            i, f, g, o = jnp.split(x_gates + h_prev @ w_hh, 4)
            c = nn.sigmoid(f) * c_prev + nn.sigmoid(i) * jnp.tanh(g)
            h_new = nn.sigmoid(o) * jnp.tanh(c)
            return (h_new, c), h_new

        zeros = jnp.zeros((h,), x.dtype)
        return jax.lax.scan(step, (zeros, zeros), x @ w_ih + bias)[1]


class PromptEncoder(nn.Module):
    """PEFT's PromptEncoder in training form: the (L, d) prompt, float32 (it does not depend on the batch)."""
    spec: PTuning
    features: int

    @nn.compact
    def __call__(self):
        spec, h = self.spec, self.spec.hidden
        x = param(self, "embedding", normal(1.0), (spec.length, self.features), (None, "embed"))  # nn.Embedding
        if spec.encoder == "mlp":
            return _mlp(x, (h, h, self.features), ("mlp_0", "mlp_1", "mlp_2"))
        for k in range(spec.layers):
            forward, backward = LSTM(h, name=f"lstm_{k}"), LSTM(h, name=f"lstm_{k}_reverse")
            x = jnp.concatenate([forward(x), backward(x[::-1])[::-1]], -1)
        return _mlp(x, (2 * h, self.features), ("mlp_0", "mlp_1"))


class PTuningKind(PromptKind):
    """The prompt kind with an encoder: prepended like a soft prompt; PEFT's P_TUNING format (an imported
    P_TUNING adapter, a folded prompt only, loads as plain prompt tuning, PromptKind.peft_load)."""
    name, spec, leaves = "ptuning", PTuning, r"^ptuning/"
    peft_type = "P_TUNING"
    peft_options = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                              "num_layers", "encoder_reparameterization_type", "encoder_hidden_size",
                              "encoder_num_layers", "encoder_dropout"})

    def input_embeddings(self, spec: PTuning, config, *, name: str):
        if spec.folded:
            return SoftPrompt(spec.length, config.hidden_size, name=name)()
        return PromptEncoder(spec, config.hidden_size, name=name)()

    def fold(self, spec: PTuning, params: dict, config):
        """Evaluate the encoder once: `ptuning/{embedding,mlp_*,lstm_*}` -> `ptuning/embedding`, the prompt."""
        if spec.folded:
            return params, spec
        prompt = PromptEncoder(spec, config.hidden_size).apply({"params": params[self.name]})
        return {**params, self.name: {"embedding": prompt}}, dataclasses.replace(spec, folded=True)

    def bank_spec(self, specs):
        """One length for every task (see `one_length`), in the folded form."""
        unfolded = [task for task, s in specs.items() if s is not None and not s.folded]
        if unfolded:
            raise UserError(f"task {unfolded[0]!r}: its P-tuning prompt is in training form (an encoder); give "
                            "the folded form (TaskAdapter.from_trained folds it, or use method.folded)")
        return one_length(self.name, specs)

    def peft_export(self, spec: PTuning, flat: dict, ctx):
        config = dict(ctx.prompt_config(spec.length), token_dim=ctx.config.hidden_size,
                      num_attention_heads=ctx.config.num_heads, encoder_reparameterization_type=spec.encoder.upper(),
                      encoder_hidden_size=spec.hidden, encoder_num_layers=spec.layers, encoder_dropout=0.0)
        return config, {"prompt_embeddings": np.asarray(flat["ptuning/embedding"])}


KIND = register(PTuningKind())
