"""Manual prompts: zero trainable parameters, a text template only (the prompt-engineering
baseline, evaluated zero-shot). `template` replaces the task's, e.g.
"Review: {text}\nSentiment:"; the task's verbalizer maps classes to words."""

from ptune.errors import UserError
from ptune.methods.base import Method


def make(model_config, template: str | None = None) -> Method:
    if template is not None and not (isinstance(template, str) and "{text}" in template):
        raise UserError(f"method manual: template {template!r} must contain the '{{text}}' field")
    return Method("manual", trains=False, template=template)
