"""VeRA (PEFT's VeraConfig): dW = A diag(lambda_d) B diag(lambda_b) on the target layers, with A and B
frozen random projections shared by every layer (PEFT's, drawn from `projection_seed`, its
projection_prng_key) and lambda_b = 0 at init; r + out trainable parameters a layer.
PEFT's defaults: r = 256, d_initial = 0.1, LoRA's targets.
"""

from ptune.errors import UserError
from ptune.methods.base import Method, module_names, number, positive_int
from ptune.models.sites import KINDS, Sites, VeRA, targets_regex
from ptune.models.sites.vera import projection_shape


def make(model_config, rank: int = 256, targets=None, d_initial: float = 0.1, dropout: float = 0.0,
         projection_seed: int = 0) -> Method:
    positive_int("vera", "rank", rank)
    # lambda_b starts at 0, so lambda_d = 0 too would leave both without a gradient.
    d_initial = number("vera", "d_initial", d_initial, lambda v: v != 0, "nonzero (lambda_b starts at 0, so "
                       "d_initial = 0 would leave both vectors without a gradient); PEFT's default is 0.1")
    dropout = number("vera", "dropout", dropout, lambda v: 0 <= v < 1, "in [0, 1)")
    if isinstance(projection_seed, bool) or not isinstance(projection_seed, int) or not 0 <= projection_seed < 2**32:
        raise UserError(f"method vera: projection_seed={projection_seed!r} must be an integer in [0, 2**32), as "
                         "torch.Generator.manual_seed takes it")
    targets = module_names("vera", "targets", targets) or KINDS["vera"].defaults_for(
        model_config.family, model_config.model_type)["targets"]
    targets = targets_regex(targets)
    spec = VeRA(rank, targets, projection_shape(model_config, targets), projection_seed, d_initial, dropout)
    return Method("vera", Sites(vera=spec), rules=[(r"/vera_lambda_[bd]$", "vera")])
