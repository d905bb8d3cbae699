"""Loading checkpoints: HF directories in, bad checkpoints out with a clear error."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptune import assets  # noqa: E402
from ptune.config import base_config, with_method  # noqa: E402
from ptune.models import build, pretrained  # noqa: E402
from ptune.training import builder  # noqa: E402


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A random BERT saved as an HF directory (safetensors), with MiniLM's tokenizer files."""
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(assets.ensure("minilm") / name, tmp_path / name)
    return tmp_path


def test_hf_directory_loads_and_matches(tiny_bert_dir):
    cfg, params = pretrained.load(tiny_bert_dir)
    ids = np.array([[101, 2023, 2003, 102]])
    expected = transformers.BertModel.from_pretrained(tiny_bert_dir).eval()(torch.tensor(ids)).last_hidden_state
    got = build(cfg).apply({"params": params}, ids, output="hidden")
    assert cfg.hidden_size == 32 and np.abs(np.asarray(got) - expected.detach().numpy()).max() < 1e-5


def test_unknown_architecture(tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    (tiny_bert_dir / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match=r"unknown architecture model_type='t5'"):
        pretrained.load(tiny_bert_dir)


def test_truncated_safetensors(tiny_bert_dir):
    weights = tiny_bert_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pretrained.load(tiny_bert_dir)


def test_pickle_only_directory_is_refused(tiny_bert_dir):
    (tiny_bert_dir / "model.safetensors").rename(tiny_bert_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        pretrained.load(tiny_bert_dir)


def test_tokenizer_that_does_not_fit_the_vocabulary(tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    (tiny_bert_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    run = with_method(base_config(), "lora")
    run.model.checkpoint = str(tiny_bert_dir)
    with pytest.raises(ValueError, match="has 30522 tokens but the model's vocabulary is 1000"):
        builder.setup(run)
