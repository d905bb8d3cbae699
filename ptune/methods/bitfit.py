"""BitFit (Ben Zaken et al., 2022): only the bias terms of the pretrained model train."""

from ptune.methods.base import Method
from ptune.methods.head import NOT_HEAD


def make(model_config) -> Method:
    return Method("bitfit", rules=[(NOT_HEAD + r".*/bias$", "bitfit")])
