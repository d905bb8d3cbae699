"""LoRA on a tiny random-init GPT-2 learning the synthetic sentiment task (CPU, ~1 minute).

    python scripts/train.py --config experiments/default.py --workdir workdirs/default

Expected: validation accuracy >= 0.95 after 200 steps (chance is 0.5).
Try another method: --config experiments/default.py:prompt  (any registered name or 'lora+prompt').
"""

from ptune.config import base_config, with_method


def get_config(method: str = "lora"):
    config = with_method(base_config(), method)
    config.model.preset = "gpt2-tiny"
    config.task.name = "synthetic_sentiment"
    config.train.steps = 200
    config.train.eval_every = 100
    config.optim.learning_rate = 3e-3
    return config
