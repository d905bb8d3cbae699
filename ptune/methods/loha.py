"""LoHa (PEFT's LoHaConfig): dW = (alpha / r) (W1a W1b) * (W2a W2b) on the target layers, W2b = 0 at
init; 2r(in + out) parameters a layer. PEFT's defaults: r = alpha = 8, LoRA's targets."""

from ptune.methods.base import Method, module_names, number, positive_int
from ptune.models.sites import KINDS, LoHa, Sites, targets_regex


def make(model_config, rank: int = 8, alpha: float = 8.0, targets=None) -> Method:
    positive_int("loha", "rank", rank)
    alpha = number("loha", "alpha", alpha, lambda v: v > 0, "> 0")
    targets = module_names("loha", "targets", targets) or KINDS["loha"].defaults_for(
        model_config.family, model_config.model_type)["targets"]
    targets = targets_regex(targets)
    return Method("loha", Sites(loha=LoHa(rank, alpha, targets)), rules=[(KINDS["loha"].leaves, "loha")])
