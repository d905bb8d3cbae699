"""LoRA on a tiny random-init GPT-2 learning the synthetic sentiment task (no downloads, ~10 s).

    python scripts/train.py --config experiments/default.py --workdir workdirs/default

Expected: validation accuracy 0.93 after 200 steps (chance 0.5). The base is random, so this
shows the machinery; experiments/sentiment_smollm2.py tunes a pretrained model.
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
