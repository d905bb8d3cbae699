"""VeRA, LoHa and LoKr adapters in PEFT's format: ptune's load in `peft.PeftModel`, PEFT's load in ptune,
with matching logits (tiny random models, every trainable tensor drawn away from its init), and
ptune's VeRA projections are PEFT's bit for bit. PEFT's LoHa and LoKr wrap torch nn.Linear only,
so GPT-2 (transformers Conv1D) is refused there."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import test_hf_peft as T  # noqa: E402

from ptune import models, partition  # noqa: E402
from ptune.interop import hf_peft  # noqa: E402
from ptune.models import pretrained  # noqa: E402
from ptune.models.sites import lokr, vera  # noqa: E402

# Options away from the defaults: a projection seed, decomposed LoKr factors on both sides.
T.OPTIONS.update(vera=dict(rank=4, projection_seed=7, d_initial=0.5), loha=dict(rank=2, alpha=5.0),
                 lokr=dict(rank=1, alpha=3.0, decompose_both=True, decompose_factor=4))
# GPT-2's VeRA is saved without its projections: PEFT and ptune both redraw them from the key.
T.PEFT_CONFIGS.update(
    vera=lambda task, preset: (peft.VeraConfig(task_type=task, r=4, projection_prng_key=3, fan_in_fan_out=True,
                                               save_projection=False) if preset == "gpt2-tiny" else
                               peft.VeraConfig(task_type=task, r=4, projection_prng_key=3)),
    loha=lambda task, preset: peft.LoHaConfig(task_type=task, r=2, alpha=6),
    lokr=lambda task, preset: peft.LoKrConfig(task_type=task, r=2, alpha=6))   # w1 full, w2 two rank-2 factors
CASES = [("gpt2-tiny", "vera"), ("llama-tiny", "vera"), ("bert-tiny", "vera"), ("llama-tiny", "loha"),
         ("bert-tiny", "loha"), ("llama-tiny", "lokr"), ("bert-tiny", "lokr")]


@pytest.mark.parametrize("seed,rank,projection", [(0, 4, (64, 192)), (7, 256, (768, 2304)), (2**32 - 1, 3, (5, 11))])
def test_vera_projections_are_peft_bit_for_bit(seed, rank, projection):
    from peft.tuners.vera.model import _kaiming_init
    generator = torch.Generator(device="cpu").manual_seed(seed)
    want_a = _kaiming_init((rank, projection[0]), generator=generator).numpy()
    want_b = _kaiming_init((projection[1], rank), generator=generator).numpy()
    a, b = vera.projections(seed, rank, projection)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)


def test_lokr_factorization_is_peft():
    from peft.tuners.lokr.layer import factorization
    for dimension in [1, 7, 32, 64, 96, 127, 192, 768, 2304, 3072, 11008]:
        for factor in (-1, 1, 4, 5, 16, 100):
            assert lokr.factorization(dimension, factor) == factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("preset,name", CASES)
def test_export_loads_in_peft_with_matching_logits(preset, name):
    cfg, method, model, params = T._trained(preset, name)
    out = hf_peft.export(T._TMP / f"export-{preset}-{name}", params, method, cfg, base_name="tiny")
    config = json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == name.upper()
    reference = peft.PeftModel.from_pretrained(T._hf_model(T._base(preset)[2], cfg), str(out)).eval()
    diff = T._max_diff(T._ptune(cfg, model, params), T._torch(reference))
    print(f"export {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < T.TOL


@pytest.mark.parametrize("preset,name", CASES)
def test_peft_adapter_imports_with_matching_logits(preset, name):
    cfg, _, base_dir = T._base(preset)
    want, adapter = T._peft_adapter(preset, name)
    method, trainable = hf_peft.load(adapter, cfg)
    model = models.build(cfg, method.sites)
    _, state = pretrained.read_hf_dir(base_dir)
    # The base from the checkpoint with fresh sites: VeRA's frozen projections are drawn from the spec.
    params = models.from_checkpoint(model, state, jax.random.key(0))
    _, frozen = partition.split(params, method.labels(params))
    diff = T._max_diff(T._ptune(cfg, model, partition.merge(trainable, frozen)), want)
    print(f"import {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < T.TOL


def test_export_writes_peft_config_and_shared_projections():
    cfg, method, _, params = T._trained("llama-tiny", "vera")
    out = hf_peft.export(T._TMP / "vera-config", params, method, cfg)
    config = json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["projection_prng_key"], config["d_initial"]) == (4, 7, 0.5)
    assert config["save_projection"]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors.numpy import load_file
    tensors = load_file(str(out / hf_peft.ADAPTER_WEIGHTS))
    # One A (r, max in) and B (max out, r) for all layers: q_proj is (64 -> 64), v_proj (64 -> 32).
    assert tensors["base_model.vera_A"].shape == (4, 64) and tensors["base_model.vera_B"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_b"].shape == (32,)
    assert len(tensors) == 2 + 2 * 2 * 2      # projections + 2 layers x (q, v) x (lambda_b, lambda_d)


def test_vera_adapter_with_other_projections_is_refused():
    from safetensors.numpy import load_file, save_file
    cfg, method, _, params = T._trained("bert-tiny", "vera")
    good = hf_peft.export(T._TMP / "vera-good", params, method, cfg)
    bad = T._TMP / "vera-bad"
    shutil.copytree(good, bad)
    tensors = load_file(str(good / hf_peft.ADAPTER_WEIGHTS))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.5
    save_file(tensors, str(bad / hf_peft.ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match=r"'base_model.vera_A' \(4, 64\) is not the projection PEFT draws from "
                                         r"projection_prng_key=7"):
        hf_peft.load(bad, cfg)


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_gpt2_lycoris_export_is_refused(name):
    cfg, method, _, params = T._trained("gpt2-tiny", name)
    with pytest.raises(ValueError, match=f"PEFT's {name.upper()} wraps torch nn.Linear layers only, and GPT-2's"):
        hf_peft.export(T._TMP / f"refused-{name}", params, method, cfg)
    assert not (T._TMP / f"refused-{name}").exists()
