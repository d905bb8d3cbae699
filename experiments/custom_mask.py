"""A method written outside the package: LayerNorm tuning + LoRA on the MLP input layer.

    python scripts/train.py --config experiments/custom_mask.py --workdir workdirs/custom

Expected: trainable = norms (2 x 64 x 5 = 640) + LoRA (2 x 4 x (64 + 256) = 2,560) on gpt2-tiny.
"""

from ptune import methods
from ptune.config import base_config, with_method
from ptune.models.sites import LoRA, Sites


def norms_and_mlp_lora(model_config, rank: int = 4):
    def label(path, leaf):          # (path, leaf) -> group; None leaves the leaf frozen
        if "/lora_" in path:
            return "lora"
        if "/ln_" in path:
            return "norm"
    return methods.Method("norms_mlp_lora", Sites(lora=LoRA(rank, 2.0 * rank, r"mlp/c_fc$")), rules=label)


methods.register("norms_mlp_lora", norms_and_mlp_lora)


def get_config():
    return with_method(base_config(), "norms_mlp_lora")
