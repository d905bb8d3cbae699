"""IA3 (Liu et al., 2022): learned scales, initialised to 1, on the outputs of the target
layers (keys, values) and on the input of the feed-forward output layer (PEFT semantics)."""

from ptune.methods.base import Method, module_names
from ptune.models.sites import IA3, KINDS, Sites, targets_regex


def make(model_config, targets=None, feedforward=None) -> Method:
    defaults = KINDS["ia3"].defaults_for(model_config.family, model_config.model_type)
    # feedforward=[] is meaningful (no layer scaled on its input), so only None takes the default.
    targets, feedforward = module_names("ia3", "targets", targets), module_names("ia3", "feedforward", feedforward)
    feedforward = defaults["feedforward"] if feedforward is None else feedforward
    sites = Sites(ia3=IA3(targets_regex(targets or defaults["targets"]), targets_regex(feedforward)))
    return Method("ia3", sites, rules=[(r"/ia3$", "ia3")])
