"""The task head alone (a linear probe); like PEFT's `modules_to_save`, it composes with
every method, and training adds it automatically when the task uses a fresh head."""

from ptune.methods.base import Method

HEAD = r"^(classifier|score)/"
NOT_HEAD = r"^(?!(classifier|score)/)"


def make(model_config) -> Method:
    if not model_config.num_labels:
        raise ValueError("method head: the model has no task head; set model.num_labels > 0 "
                         "(or use a task with a classification head)")
    return Method("head", rules=[(HEAD, "head")])
