"""LoRA on the shipped SmolLM2-135M-Instruct (4-bit GGUF, dequantized to f32) for UCI sentiment
(amazon + imdb + yelp), classifying by the LM's next token after a manual template.

    python scripts/train.py --config experiments/sentiment_smollm2.py --workdir workdirs/sentiment

Expected on a 2-core CPU: ~6 minutes (1.7 s/step), validation accuracy 0.953 (300 sentences;
zero-shot with the same template, `--config experiments/sentiment_smollm2.py:manual`: 0.917).
"""

from ptune.config import base_config, with_method


def get_config(method: str = "lora"):
    config = with_method(base_config(), method)
    config.model.checkpoint = "smollm2"
    config.task.name = "sentiment"
    config.task.options = {"domain": "all"}
    config.task.max_length = 64
    config.optim.learning_rate = 1e-3
    config.train.update(steps=150, batch_size=8, eval_batch_size=50, eval_every=75, log_every=10)
    return config
