"""P-tuning (Liu et al., 2021): a soft prompt of L virtual tokens produced during training by a prompt
encoder, PEFT's PromptEncoderConfig: an MLP (`encoder="mlp"`) or a bidirectional LSTM with an MLP on top
(`encoder="lstm"`, `layers` LSTM layers), width `hidden` (encoder_hidden_size; 128 as in PEFT's P-tuning
guide, where PEFT's unset default is the model's hidden size). The encoder is folded into the prompt for
inference and saving (the ptuning kind's `fold`, ptune.models.sites.ptuning)."""

from ptune.errors import UserError
from ptune.methods.base import Method, positive_int
from ptune.models.sites import PTuning, Sites
from ptune.models.sites.ptuning import ENCODERS


def make(model_config, length: int = 20, encoder: str = "mlp", hidden: int = 128, layers: int = 2) -> Method:
    positive_int("ptuning", "length", length, model_config.max_positions, "(the model's context)")
    positive_int("ptuning", "hidden", hidden)
    positive_int("ptuning", "layers", layers)
    if encoder not in ENCODERS:
        raise UserError(f"method ptuning: encoder={encoder!r}; choose one of {ENCODERS} (PEFT's "
                        "encoder_reparameterization_type MLP or LSTM)")
    if encoder == "mlp" and layers != 2:
        raise UserError(f"method ptuning: layers={layers} sets the LSTM's layers, and PEFT's MLP encoder always "
                        "has three linear layers; drop layers or set encoder='lstm'")
    return Method("ptuning", Sites(ptuning=PTuning(length, encoder, hidden, layers)), rules=[(r"^ptuning/", "ptuning")])
