"""LN tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"), PEFT's LNTuningConfig: only the scales
and biases of the target LayerNorm / RMSNorm layers train, in place, so no site kind is needed. `targets`
(PEFT's target_modules) selects among the norm layers; the default is PEFT's per family, and for BERT,
which PEFT gives none, every LayerNorm.

PEFT keeps trained copies of those layers (`<module>.ln_tuning_layers.{weight,bias}`); `PEFT` reads and
writes that format for ptune.interop.hf_peft, as a site kind's PEFT hooks do.
"""

import functools
import re

import flax.linen as nn

from ptune import models, partition
from ptune.errors import UserError
from ptune.methods.base import Method, module_names
from ptune.models.sites import targets_regex

DEFAULTS = {"gpt2": ["ln_1", "ln_2", "ln_f"], "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
            "bert": ["LayerNorm"]}


def make(model_config, targets=None) -> Method:
    regex = targets_regex(module_names("ln_tuning", "targets", targets) or DEFAULTS[model_config.family])
    norms = norm_layers(model_config)
    chosen = frozenset(m for m in norms if re.search(regex, m))
    if not chosen:
        raise UserError(f"method ln_tuning: targets={targets!r} match no norm layer of this {model_config.family} "
                        f"model; its norm layers are {sorted({m.rpartition('/')[2] for m in norms})}")
    return Method("ln_tuning", rules=lambda path, _: "ln_tuning" if path.rpartition("/")[0] in chosen else None)


@functools.cache
def norm_layers(model_config) -> list[str]:
    """Module paths of the model's LayerNorm / RMSNorm layers (those with a `scale`)."""
    params = partition.flatten(nn.unbox(models.abstract_params(models.build(model_config))))
    return [p.removesuffix("/scale") for p in params if p.endswith("/scale")]


class PeftFormat:
    """LN tuning's HF PEFT format: each trained norm layer whole, as `<module>.ln_tuning_layers.*`."""
    name, peft_type, peft_options = "ln_tuning", "LN_TUNING", frozenset()
    NAMES = {"ln_tuning_layers.weight": "scale", "ln_tuning_layers.bias": "bias"}

    def holds(self, trained: list[str], model_config) -> bool:
        """Whether these trained base leaves all lie in norm layers."""
        norms = set(norm_layers(model_config))
        return bool(trained) and all(p.rpartition("/")[0] in norms for p in trained)

    def peft_export(self, trained: list[str], flat: dict, ctx):
        """`trained`: base leaves in norm layers; PEFT copies whole layers, so every leaf of theirs goes."""
        chosen = sorted({p.rpartition("/")[0] for p in trained})
        leaves = [p for p in flat if p.rpartition("/")[0] in chosen]
        config = {"target_modules": ctx.target_modules(chosen, ctx.layers + norm_layers(ctx.config))}
        return config, {ctx.peft_key(p, self.NAMES): flat[p] for p in leaves}

    def peft_load(self, config: dict, tensors: dict, ctx):
        norms = norm_layers(ctx.config)
        origin = ctx.layer_leaves("norm", tensors, self.NAMES, norms)
        chosen = sorted({p.rpartition("/")[0] for p in origin})
        return "ln_tuning", {"targets": ctx.names(chosen, norms)}, origin


PEFT = PeftFormat()
