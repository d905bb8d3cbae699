"""P-tuning v2 (Liu et al., 2022): deep prompts, trainable keys/values at every layer,
without reparameterisation (with a task head for classification)."""

from ptune.methods.base import Method, positive_int
from ptune.models.sites import Prefix, Sites


def make(model_config, length: int = 20) -> Method:
    positive_int("ptuning_v2", "length", length, model_config.max_positions, "(the model's context)")
    return Method("ptuning_v2", Sites(prefix=Prefix(length, None)), rules=[(r"^prefix/", "prefix")])
