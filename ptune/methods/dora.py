"""DoRA (Liu et al., 2024): LoRA with a learned magnitude per output column (PEFT's use_dora):
W' = m * (W + s B A) / ||W + s B A||, m = ||W|| at init. Options as LoRA's, `init` included."""

from ptune.methods.base import Method
from ptune.methods.lora import from_base_initializer, lora_spec
from ptune.models.sites import Sites


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=None, rslora: bool = False,
         dropout: float = 0.0, init: str = "random") -> Method:
    spec = lora_spec("dora", model_config, rank, alpha, targets, rslora, dropout, init)
    return Method("dora", Sites(dora=spec), rules=[(r"/dora_[abm]$", "dora")],
                  init=from_base_initializer("dora", init, spec))
