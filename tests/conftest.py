import pytest

from ptune import cli
from ptune.config import base_config, with_method

cli.set_xla_flags()   # as the launchers do, before JAX starts (remat and memory tests depend on it)


@pytest.fixture
def make_config():
    """A tiny, fast config: make_config("lora", preset="llama-tiny", rank=4)."""
    def make(method="lora", preset="gpt2-tiny", steps=3, **options):
        config = with_method(base_config(), method, **options)
        config.model.preset = preset
        config.task.options = {"n_train": 64, "n_eval": 32}
        config.task.max_length = 32
        config.train.update(steps=steps, batch_size=4, eval_batch_size=16, eval_every=100, log_every=1,
                            progress=False)
        return config
    return make
