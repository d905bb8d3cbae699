"""LoRA (Hu et al., 2021): W x + (alpha / r) B A x on the target layers, B = 0 at init.

`rslora` scales by alpha / sqrt(r) (Kalajdzievski, 2023); `lr_ratio_b` > 1 gives B
its own optimizer group with that learning-rate multiple (LoRA+, Hayou et al., 2024).
"""

from ptune.methods.base import Method, module_names, number, positive_int
from ptune.models.sites import KINDS, LoRA, Sites, targets_regex


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=None, rslora: bool = False,
         dropout: float = 0.0, lr_ratio_b: float = 1.0) -> Method:
    positive_int("lora", "rank", rank)
    alpha = number("lora", "alpha", alpha, lambda v: v > 0, "> 0")
    dropout = number("lora", "dropout", dropout, lambda v: 0 <= v < 1, "in [0, 1)")
    lr_ratio_b = number("lora", "lr_ratio_b", lr_ratio_b, lambda v: v >= 1, ">= 1")
    defaults = KINDS["lora"].defaults[model_config.family]
    targets = targets_regex(module_names("lora", "targets", targets) or defaults["targets"])
    sites = Sites(lora=LoRA(rank, alpha, targets, rslora, dropout))
    if lr_ratio_b == 1:
        return Method("lora", sites, rules=[(r"/lora_[ab]$", "lora")])
    return Method("lora", sites, rules=[(r"/lora_a$", "lora"), (r"/lora_b$", "lora_b")],
                  optim={"lora_b": {"lr_scale": float(lr_ratio_b)}})
