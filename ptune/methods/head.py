"""The task head alone (a linear probe); like PEFT's `modules_to_save`, it composes with
every method, and training adds it automatically when the task uses a fresh head."""

from ptune.errors import UserError
from ptune.methods.base import Method
from ptune.models.model_config import HEAD_NAMES

HEAD = rf"^({'|'.join(HEAD_NAMES)})/"
NOT_HEAD = rf"^(?!({'|'.join(HEAD_NAMES)})/)"


def make(model_config) -> Method:
    if not model_config.num_labels:
        raise UserError("method head: the model has no task head; set model.num_labels > 0 "
                        "(or use a task with a classification head)")
    return Method("head", rules=[(HEAD, "head")])
