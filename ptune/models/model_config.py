"""One config dataclass for every family, with named presets."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ptune.errors import UserError
from ptune.models import rope_scaling

FAMILIES = ("gpt2", "llama", "bert")
DTYPES = ("float32", "bfloat16")
# Per-block rematerialisation: "none", "full" (keep only the block's inputs, recompute the rest in
# the backward pass) or a `jax.checkpoint_policies` name saying which intermediates to keep.
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


# The task head's module name in every family (HF's: `classifier` in BERT, `score` in decoders); the
# head rules (methods.head), the bank and the PEFT format all read it from here.
HEAD_NAMES = ("classifier", "score")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    num_kv_heads: int | None = None     # grouped-query attention; None = num_heads
    head_dim: int | None = None         # llama: per-head width; None = hidden_size / num_heads
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    rope_theta: float = 10000.0         # llama
    rope_scaling: tuple = ()            # llama: HF rope_parameters as sorted (key, value) pairs; see rope_scaling
    tie_embeddings: bool = True         # decoders: lm head = token embedding
    qkv_bias: bool = False              # llama (Qwen2 style)
    qk_norm: bool = False               # llama: RMSNorm over each head's q and k before RoPE (Qwen3 style)
    sliding_window: int | None = None   # llama: a query sees the keys of its last `sliding_window` slots (Mistral)
    type_vocab_size: int = 2            # bert
    num_labels: int = 0                 # task head size; 0 = no head
    dropout: float = 0.0
    dtype: str = "float32"              # compute dtype; parameters stay float32 and are cast at use
    frozen_dtype: str = "float32"       # storage of the frozen leaves (see ptune.training.builder.setup)
    remat: str = "none"                 # one of REMAT

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"model.family={self.family!r}; choose one of {FAMILIES}")
        for key in ("dtype", "frozen_dtype"):
            if getattr(self, key) not in DTYPES:
                raise UserError(f"model.{key}={getattr(self, key)!r}; choose one of {DTYPES}")
        if self.remat not in REMAT:
            raise UserError(f"model.remat={self.remat!r}; choose one of {REMAT}")
        try:
            object.__setattr__(self, "rope_scaling", rope_scaling.normalise(self.rope_scaling))   # hashable
        except UserError as e:
            raise UserError(f"model.rope_scaling: {e}") from None
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        explicit_head_dim = self.head_dim is not None
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_positions", "type_vocab_size", "num_labels", "sliding_window"):
            value, least = getattr(self, key), 0 if key == "num_labels" else 1
            if value is None and key in ("head_dim", "sliding_window"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"model.{key}={value!r} must be an integer >= {least}")
        for key, ok, wanted in (("dropout", lambda v: 0 <= v < 1, "in [0, 1)"), ("norm_eps", lambda v: v > 0, "> 0"),
                                ("rope_theta", lambda v: v > 0, "> 0")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise UserError(f"model.{key}={value!r} must be a number {wanted}")
        # An explicit head_dim frees the llama family from hidden_size = num_heads * head_dim (Qwen3).
        if (not explicit_head_dim and self.hidden_size % self.num_heads) or self.num_heads % self.num_kv_heads:
            raise UserError(f"model: hidden_size {self.hidden_size}, num_heads {self.num_heads} and "
                            f"num_kv_heads {self.num_kv_heads} must divide evenly")
        if not explicit_head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self._check_llama_only()

    def _check_llama_only(self):
        """The llama family's attention options, refused elsewhere: GPT-2's and BERT's have none."""
        if self.family == "llama":
            return
        plain = dict(rope_scaling=(), head_dim=self.hidden_size // self.num_heads, qk_norm=False, sliding_window=None)
        for key, value in plain.items():
            if getattr(self, key) != value:
                raise UserError(f"model.{key} applies to the llama family, not {self.family} (it is "
                                f"{getattr(self, key)!r}, not {value!r})")

    @property
    def model_type(self) -> str:
        """The HF model_type this config is (see hf_config.config_to_hf): LLaMA's attention_bias would
        bias o_proj too, so qkv biases are Qwen2's; q/k norms are Qwen3's; a window alone is Mistral's."""
        if self.family != "llama":
            return self.family
        return ("qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else
                "mistral" if self.sliding_window is not None else "llama")

    @property
    def causal(self) -> bool:
        return self.family != "bert"

    @property
    def head_name(self) -> str:   # one of HEAD_NAMES
        return "classifier" if self.family == "bert" else "score"

    @property
    def head_bias(self) -> bool:
        return self.family == "bert"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


PRESETS: dict[str, dict] = {
    # Real shapes (weights come from checkpoints; see the real-models issue).
    "gpt2": dict(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, max_positions=1024),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, intermediate_size=1536, max_positions=8192, norm_eps=1e-5,
                         activation="silu", rope_theta=100000.0, tie_embeddings=True),
    "bert-base": dict(family="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, max_positions=512, norm_eps=1e-12, activation="gelu"),
    "minilm-l6": dict(family="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                      intermediate_size=1536, max_positions=512, norm_eps=1e-12, activation="gelu"),
    # Tiny shapes for tests and CPU smoke runs (random init).
    "gpt2-tiny": dict(family="gpt2", vocab_size=260, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=256, max_positions=128),
    "llama-tiny": dict(family="llama", vocab_size=260, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=160, max_positions=128, activation="silu",
                       rope_theta=10000.0, tie_embeddings=False),
    "qwen3-tiny": dict(family="llama", vocab_size=260, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=32, qk_norm=True, intermediate_size=160, max_positions=128, norm_eps=1e-6,
                       activation="silu", rope_theta=1000000.0, tie_embeddings=True),   # Qwen3-0.6B's shape, shrunk
    "bert-tiny": dict(family="bert", vocab_size=260, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=256, max_positions=128, norm_eps=1e-12, activation="gelu"),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise UserError(f"model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"model config has no key(s) {unknown}; valid keys: {sorted(fields)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})
