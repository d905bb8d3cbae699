"""LoRA (Hu et al., 2021): W x + (alpha / r) B A x on the target layers, B = 0 at init.

`rslora` scales by alpha / sqrt(r) (Kalajdzievski, 2023); `lr_ratio_b` > 1 gives B
its own optimizer group with that learning-rate multiple (LoRA+, Hayou et al., 2024).
"""

from ptune.methods.base import Method, positive_int
from ptune.models import DEFAULT_TARGETS
from ptune.models.sites import LoRA, Sites, targets_regex


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=None, rslora: bool = False,
         dropout: float = 0.0, lr_ratio_b: float = 1.0) -> Method:
    positive_int("lora", "rank", rank)
    if not alpha > 0:
        raise ValueError(f"method lora: alpha={alpha!r} must be > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"method lora: dropout={dropout!r} must be in [0, 1)")
    if not lr_ratio_b >= 1:
        raise ValueError(f"method lora: lr_ratio_b={lr_ratio_b!r} must be >= 1")
    targets = targets_regex(targets or DEFAULT_TARGETS[model_config.family]["lora"])
    sites = Sites(lora=LoRA(rank, float(alpha), targets, rslora, dropout))
    if lr_ratio_b == 1:
        return Method("lora", sites, rules=[(r"/lora_[ab]$", "lora")])
    return Method("lora", sites, rules=[(r"/lora_a$", "lora"), (r"/lora_b$", "lora_b")],
                  optim={"lora_b": {"lr_scale": float(lr_ratio_b)}})
