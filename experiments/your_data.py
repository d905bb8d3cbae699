"""Your own data (ptune.data.files) with LoRA on the shipped SmolLM2-135M-Instruct, one config per kind:
`:classify` (the default), `:lm`, `:generate`, `:chat`. Point config.task.options at your files;
README.md's "Your own data" shows the records each kind expects.

    python scripts/train.py --config experiments/your_data.py:classify --workdir workdirs/reviews \\
        --config.task.options.train=data/reviews/train.jsonl \\
        --config.task.options.validation=data/reviews/validation.jsonl

    python scripts/train.py --config experiments/your_data.py:chat --workdir workdirs/support \\
        --config.task.options.train=data/support/train.jsonl

Measured on a 2-core AMD EPYC shared with other jobs, so the times are loose (BUILD_NOTES.md, "Your own
data"); "zero-shot" is the untrained base (LoRA is the identity at init):
- classify: the shipped sentiment sentences as the README's review/rating files (2,400 train, 300
  validation): validation accuracy 0.783 zero-shot, 0.947 after 150 steps (25 min here).
- chat: ChatterBot's 983 question/answer pairs as one-exchange conversations (10% carved for
  validation): perplexity of the assistant turns 11.9 zero-shot, 6.40 after 30 steps, 5.97 after 60 (15 min).
- generate: the shipped `~/.cache/ptune/data/chatterbot_qa/{train,validation}.jsonl` (input/output):
  perplexity of the answers 27.1 zero-shot, 16.2 after 30 steps, 15.1 after 60 (14 min).
- lm: the shipped Brown documents, `~/.cache/ptune/data/brown_lm/{train,validation}.jsonl`, cut to 256
  tokens: perplexity 50.8 zero-shot, 42.2 after 30 steps, 41.2 after 60 (18 min).
"""

from ptune.config import base_config, with_method, with_task
from ptune.errors import UserError

KIND_SETTINGS = {   # kind -> (max_length, packing, steps)
    "classify": (128, False, 150),
    "lm": (256, True, 60),
    "generate": (256, True, 60),
    "chat": (256, True, 60),
}


def get_config(kind: str = "classify"):
    if kind not in KIND_SETTINGS:
        raise UserError(f"experiments/your_data.py:{kind}: choose one of {sorted(KIND_SETTINGS)}")
    config = with_task(with_method(base_config(), "lora"), "files", kind=kind)
    config.model.checkpoint = "smollm2"
    config.task.max_length, config.task.packing, steps = KIND_SETTINGS[kind]
    config.optim.learning_rate = 1e-3
    config.train.update(steps=steps, batch_size=8, eval_batch_size=16, eval_every=steps // 2, log_every=10)
    return config
