"""Full fine-tuning: every pretrained weight trains."""

from ptune.methods.base import Method
from ptune.methods.head import NOT_HEAD


def make(model_config) -> Method:
    return Method("full", rules=[(NOT_HEAD, "full")])
