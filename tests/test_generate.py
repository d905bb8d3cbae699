import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import methods, models
from ptune.inference import generate

EOS, PAD = 258, 256
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]    # different lengths: the second is left-padded


def _sited(preset, name, **options):
    cfg = models.model_config(preset)
    method = methods.get(name, cfg, **options)
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(1))
    # Move every site away from its identity init so it really changes the outputs.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params


def _check_greedy_against_full_forward(model, params, prompt, generated):
    """Teacher-forced: one uncached forward over prompt + generated must pick each generated token."""
    n = int(np.argmax(generated == EOS)) + 1 if (generated == EOS).any() else len(generated)
    seq = jnp.asarray([list(prompt) + generated[:n].tolist()])
    picks = jnp.argmax(model.apply({"params": params}, seq, output="logits")[0, len(prompt) - 1:-1], -1)
    assert picks.tolist() == generated[:n].tolist()
    assert (generated[n:] == PAD).all()


METHODS = [("full", {}), ("lora", {}), ("adapter", {}), ("ia3", {}), ("prompt", {"init": "uniform", "length": 4}),
           ("prefix", {"hidden": 16}), ("ptuning_v2", {}), ("lora+prompt", {"prompt": {"init": "uniform"}})]
POSITIONAL = ("prompt", "prefix", "lora+prompt")   # the sites that shift positions: also under RoPE


@pytest.mark.parametrize("preset,name,options", [("gpt2-tiny", n, o) for n, o in METHODS] +
                         [("llama-tiny", n, o) for n, o in METHODS if n in POSITIONAL])
def test_cached_greedy_equals_uncached_forward(preset, name, options):
    model, params = _sited(preset, name, **options)
    out = generate.generate(model, params, PROMPTS, 6, eos_id=EOS, pad_id=PAD)
    for row, prompt in zip(out, PROMPTS):
        _check_greedy_against_full_forward(model, params, prompt, row)


def test_sampling_controls():
    model, params = _sited("gpt2-tiny", "lora")
    greedy = generate.generate(model, params, PROMPTS, 8, eos_id=EOS, pad_id=PAD)
    top1 = generate.generate(model, params, PROMPTS, 8, eos_id=EOS, pad_id=PAD, temperature=1.0, top_k=1)
    nucleus = generate.generate(model, params, PROMPTS, 8, eos_id=EOS, pad_id=PAD, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(top1, greedy)
    np.testing.assert_array_equal(nucleus, greedy)
    hot = [generate.generate(model, params, PROMPTS, 8, eos_id=EOS, pad_id=PAD, temperature=5.0,
                             rng=jax.random.key(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert not np.array_equal(hot[0], hot[2])


def test_rows_stop_at_eos():
    model, params = _sited("gpt2-tiny", "full")
    first = generate.generate(model, params, PROMPTS, 1, eos_id=EOS, pad_id=PAD)[:, 0]
    # Declare the first generated token of row 0 to be EOS: the rest of that row must be padding.
    out = generate.generate(model, params, PROMPTS, 5, eos_id=int(first[0]), pad_id=PAD)
    assert out[0, 0] == first[0] and (out[0, 1:] == PAD).all()


def test_bad_generation_requests():
    model, params = _sited("gpt2-tiny", "lora")
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        generate.generate(model, params, PROMPTS, 200, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate.generate(model, params, PROMPTS, 0, eos_id=EOS, pad_id=PAD)
    bert, bert_params = _sited("bert-tiny", "lora")
    with pytest.raises(ValueError, match="needs a causal model"):
        generate.generate(bert, bert_params, PROMPTS, 2, eos_id=EOS, pad_id=PAD)
