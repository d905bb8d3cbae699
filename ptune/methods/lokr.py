"""LoKr (PEFT's LoKrConfig): dW = (alpha / r) W1 (x) W2 on the target layers, W1 = 0 at init.

`decompose_factor` bounds the smaller factor of each side's factoring (-1: near the square root);
W2, and W1 with `decompose_both`, is two rank-r factors where that is smaller (ptune.models.sites.lokr).
PEFT's defaults: r = alpha = 8, LoRA's targets; its rank dropout is off.
"""

from ptune.errors import UserError
from ptune.methods.base import Method, module_names, number, positive_int
from ptune.models.sites import KINDS, LoKr, Sites, targets_regex


def make(model_config, rank: int = 8, alpha: float = 8.0, targets=None, decompose_both: bool = False,
         decompose_factor: int = -1) -> Method:
    positive_int("lokr", "rank", rank)
    alpha = number("lokr", "alpha", alpha, lambda v: v > 0, "> 0")
    if not isinstance(decompose_both, bool):
        raise UserError(f"method lokr: decompose_both={decompose_both!r} must be true or false")
    if decompose_factor != -1 and (isinstance(decompose_factor, bool) or not isinstance(decompose_factor, int)
                                   or decompose_factor <= 0):
        raise UserError(f"method lokr: decompose_factor={decompose_factor!r} must be a positive integer, or -1 "
                        "(each side factored near its square root)")
    targets = module_names("lokr", "targets", targets) or KINDS["lokr"].defaults_for(
        model_config.family, model_config.model_type)["targets"]
    targets = targets_regex(targets)
    sites = Sites(lokr=LoKr(rank, alpha, targets, decompose_both, decompose_factor))
    return Method("lokr", sites, rules=[(KINDS["lokr"].leaves, "lokr")])
