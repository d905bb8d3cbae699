"""Bottleneck adapters: x + up(act(down(x))) with up = 0 at init. Houlsby et al. (2019)
place one after attention and one after the MLP of every block; Pfeiffer et al. (2021)
only after the MLP."""

from ptune.errors import UserError
from ptune.methods.base import Method, positive_int
from ptune.models.ops import ACTIVATIONS
from ptune.models.sites import Adapter, Sites

PLACEMENTS = ("houlsby", "pfeiffer")


def make(model_config, size: int = 64, placement: str = "houlsby", activation: str = "relu") -> Method:
    positive_int("adapter", "size", size)
    if placement not in PLACEMENTS:
        raise UserError(f"method adapter: placement={placement!r}; choose one of {PLACEMENTS}")
    if activation not in ACTIVATIONS:
        raise UserError(f"method adapter: activation={activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return Method("adapter", Sites(adapter=Adapter(size, placement, activation)),
                  rules=[(r"adapter/", "adapter")])
