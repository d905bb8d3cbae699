"""Site kinds: what methods ask the model to grow, one module per kind (see `base` for the protocol).

    from ptune.models.sites import LoRA, Sites
    sites = Sites(lora=LoRA(8, 16.0, r"c_attn$"))
    register(MyKind())      # a new kind, from outside the package (experiments/dora_outside.py)

Registration order is the order kinds wrap a layer in (later ones outside) and appear in `Sites`.
"""

from ptune.models.sites.base import (KINDS, LINEAR_STAGES, LinearCall, MissingHook, SiteKind, Sites, is_site,
                                     kind_of, register, targets_regex, union_regex)
# The built-in kinds register as they are imported, in this order.
from ptune.models.sites.lora import LoRA  # noqa: I001
from ptune.models.sites import dora  # noqa: F401  (registers "dora"; its spec is LoRA's)
from ptune.models.sites.ia3 import IA3
from ptune.models.sites.adapter import Adapter
from ptune.models.sites.prefix import Prefix
from ptune.models.sites.prompt import Prompt
from ptune.models.sites.ptuning import PTuning
from ptune.models.sites.vera import VeRA
from ptune.models.sites.loha import LoHa
from ptune.models.sites.lokr import LoKr

__all__ = ["IA3", "KINDS", "LINEAR_STAGES", "Adapter", "LinearCall", "LoHa", "LoKr", "LoRA", "MissingHook", "PTuning",
           "Prefix", "Prompt", "SiteKind", "Sites", "VeRA", "is_site", "kind_of", "register", "targets_regex",
           "union_regex"]
