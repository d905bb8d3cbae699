"""DoRA (a built-in site kind, PEFT's use_dora) and LoRA's PiSSA / OLoRA starts (PEFT's init_lora_weights):
trainable counts, identity at init, the same initial factors as PEFT on the same weights, adapters that
`peft` loads (PiSSA and OLoRA as the plain rank-2r LoRA, on the original base) and that ptune loads from
`peft`, all within 1e-4, merges, the adapter bank, and short training runs from the launcher's config."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import test_bank
import test_hf_peft as hp  # a tiny base saved as HF, torch forwards, logit differences (imports peft)
from test_checkpoint import losses

from ptune import methods, models, partition
from ptune.inference import bank as bank_lib
from ptune.interop import hf_peft
from ptune.methods.base import InitContext
from ptune.models import sites

torch, peft = hp.torch, hp.peft
TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny"]
# Every targeted layer kind per family (GPT-2's fused c_attn and Conv1D mlp.c_proj; LLaMA's GQA k/v).
TARGETS = {"gpt2-tiny": ["c_attn", "mlp.c_proj"], "llama-tiny": ["q_proj", "v_proj", "down_proj"],
           "bert-tiny": ["query", "value"]}


def _started(preset, name, seed=0, **options):
    """(config, method, model, params): `name` on the preset's saved base, its `init` applied."""
    cfg, base, _ = hp._base(preset)
    method = methods.get(name, cfg, **options)
    if cfg.num_labels:
        method = methods.compose(method, methods.get("head", cfg))
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(seed), pretrained=base)
    return cfg, method, model, method.initialize(params, InitContext(jax.random.key(1), cfg.family))


def _trained(preset, name, **options):
    """_started with every trainable leaf moved away from its start (magnitudes by a factor near 1)."""
    cfg, method, model, params = _started(preset, name, **options)
    trainable, frozen = partition.split(params, method.labels(params))
    rng = np.random.default_rng(1)
    move = lambda p, x: (x * (1 + 0.2 * rng.standard_normal(x.shape)) if p.endswith("/dora_m")
                         else x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    moved = {p: move(p, np.asarray(x)) for p, x in partition.flatten(trainable).items()}
    return cfg, method, model, partition.merge(frozen, partition.unflatten(moved))


def _on_base(preset, trainable):
    """Loaded `trainable` leaves (a head included) on the preset's base."""
    flat = partition.flatten(trainable)
    base = {p: x for p, x in partition.flatten(hp._base(preset)[1]).items() if p not in flat}
    return partition.merge(trainable, partition.unflatten(base))


def _layers(params, leaf):
    return [p.rpartition("/")[0] for p in partition.flatten(params) if p.endswith("/" + leaf)]


# ------------------------------------------------------------------------------------------------ counts

def _count(preset, name, **options):
    cfg = models.model_config(preset)
    method = methods.get(name, cfg, **options)
    params = nn.unbox(models.abstract_params(models.build(cfg, method.sites)))
    base = sum(x.size for x in jax.tree.leaves(nn.unbox(models.abstract_params(models.build(cfg)))))
    return cfg, partition.summary(params, method.labels(params)).count, base


def _targeted(cfg):
    """(in, out) of the default LoRA targets of one layer (PEFT's defaults)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    return {"gpt2": [(d, 3 * d)], "bert": [(d, d), (d, d)], "llama": [(d, d), (d, kv)]}[cfg.family]


@pytest.mark.parametrize("preset", ["gpt2", "bert-base", "smollm2-135m"])
def test_dora_trains_lora_plus_a_magnitude_per_output(preset):
    cfg, count, base = _count(preset, "dora", rank=8)
    assert count == {"dora": cfg.num_layers * sum(8 * (i + o) + o for i, o in _targeted(cfg)), "frozen": base}


def test_dora_count_literal():
    assert _count("gpt2", "dora", rank=8)[1]["dora"] == 322_560   # 12 x (8 x (768 + 2304) + 2304)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initial_factors_are_frozen_copies(init):
    """A PiSSA / OLoRA start trains what LoRA trains; the frozen copies of the initial factors add as much."""
    cfg, count, base = _count("smollm2-135m", "lora", rank=8, init=init)
    lora = cfg.num_layers * sum(8 * (i + o) for i, o in _targeted(cfg))
    assert count == {"lora": lora, "frozen": base + lora}


# --------------------------------------------------------------------------------------------- the start

@pytest.mark.parametrize("preset,name,init", [
    ("gpt2-tiny", "dora", "random"), ("llama-tiny", "dora", "random"), ("bert-tiny", "dora", "random"),
    ("gpt2-tiny", "lora", "pissa"), ("llama-tiny", "lora", "olora"), ("bert-tiny", "lora", "pissa_niter_2"),
    ("llama-tiny", "dora", "pissa")])
def test_starts_as_the_base_model(preset, name, init):
    cfg, method, model, params = _started(preset, name, rank=2, targets=TARGETS[preset], init=init)
    plain = models.build(cfg)
    base = {p: x for p, x in partition.flatten(params).items() if not sites.is_site(p)}
    want, got = (hp._ptune(cfg, m, p) for m, p in ((plain, partition.unflatten(base)), (model, params)))
    np.testing.assert_allclose(got, want, atol=2e-6 if init == "random" else 1e-5, rtol=0)
    if init != "random":   # away from LoRA's start: B is W's factor, not 0
        assert min(np.abs(x).max() for p, x in partition.flatten(params).items() if p.endswith("_b")) > 0.01


def _peft_init(preset, init, rank, alpha):
    """PEFT's LoRA with `init_lora_weights=init` on the preset's saved base: {ptune module: (A, B, residual W)}
    in ptune's layout: A (in, r), B (r, out), W (in, out)."""
    cfg, _, base_dir = hp._base(preset)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS[preset], init_lora_weights=init,
                             fan_in_fan_out=cfg.family == "gpt2")
    model = peft.get_peft_model(hp._hf_model(base_dir, cfg), config).base_model.model
    out = {}
    for module in _layers(_started(preset, "lora", rank=rank, targets=TARGETS[preset])[3], "lora_a"):
        layer = model.get_submodule(hf_peft.hf.hf_module(module))
        w = layer.base_layer.weight.detach().numpy()
        out[module] = (layer.lora_A["default"].weight.detach().numpy().T, layer.lora_B["default"].weight.detach()
                       .numpy().T, w if cfg.family == "gpt2" else w.T)
    return out


@pytest.mark.parametrize("preset,init", [("gpt2-tiny", "pissa"), ("llama-tiny", "pissa"), ("llama-tiny", "olora")])
def test_initial_factors_are_peft_s(preset, init):
    """The same A, B as PEFT's (each rank-1 component up to its sign, which LAPACK may flip), and PEFT's residual
    base is ptune's kernel minus scale * A B. (PEFT's OLoRA factorises GPT-2's Conv1D weight untransposed, with
    the wrong shapes, so OLoRA is compared on LLaMA only.)"""
    rank, alpha = 2, 6.0
    cfg, method, _, params = _started(preset, "lora", rank=rank, alpha=alpha, targets=TARGETS[preset], init=init)
    flat, scale = partition.flatten(params), method.sites.lora.scale
    theirs = _peft_init(preset, init, rank, alpha)
    assert len(theirs) == len(_layers(params, "lora_a0")) > 2
    for module, (a, b, residual) in theirs.items():
        ours_a, ours_b = np.asarray(flat[f"{module}/lora_a"]), np.asarray(flat[f"{module}/lora_b"])
        sign = np.sign(np.sum(ours_a * a, axis=0))
        np.testing.assert_allclose(ours_a * sign, a, atol=1e-5, err_msg=module)
        np.testing.assert_allclose(ours_b * sign[:, None], b, atol=1e-5, err_msg=module)
        kernel = np.asarray(flat[f"{module}/kernel"])
        np.testing.assert_allclose(kernel - scale * ours_a @ ours_b, residual, atol=1e-5, err_msg=module)


def test_randomised_pissa_finds_the_top_singular_directions():
    """pissa_niter_K on a kernel with a clear top-2 spectrum: the same product A B as the exact SVD."""
    from ptune.methods.lora import factorize
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((48, 2)) @ rng.standard_normal((2, 32)) + 0.01 * rng.standard_normal((48, 32))
    exact = np.matmul(*factorize("pissa", kernel, 2, 0.5, None))
    randomised = np.matmul(*factorize("pissa_niter_2", kernel, 2, 0.5, jax.random.key(3)))
    np.testing.assert_allclose(randomised, exact, atol=1e-4)
    assert np.abs(exact).max() > 1


# ------------------------------------------------------------------------------------------------ PEFT

@pytest.mark.parametrize("preset,name,init", [
    ("gpt2-tiny", "dora", "random"), ("llama-tiny", "dora", "random"), ("bert-tiny", "dora", "random"),
    ("gpt2-tiny", "lora", "pissa"), ("llama-tiny", "lora", "olora"), ("bert-tiny", "lora", "pissa_niter_2"),
    ("llama-tiny", "dora", "pissa")])
def test_export_loads_in_peft_on_the_original_base(preset, name, init):
    """A trained adapter in `peft`, on the base as loaded (PiSSA/OLoRA as the rank-2r LoRA they are), and back
    in ptune, with ptune's logits."""
    rank, alpha = 2, 5.0
    cfg, method, model, params = _trained(preset, name, rank=rank, alpha=alpha, rslora=preset == "llama-tiny",
                                          targets=TARGETS[preset], init=init)
    out = hf_peft.export(hp._TMP / f"family-{preset}-{name}-{init}", params, method, cfg)
    config = json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())
    doubled = 1 if init == "random" else 2
    assert (config["r"], config.get("use_dora", False)) == (rank * doubled, name == "dora")
    assert config["lora_alpha"] == pytest.approx(alpha * (np.sqrt(doubled) if config["use_rslora"] else doubled))
    want = hp._ptune(cfg, model, params)
    reference = peft.PeftModel.from_pretrained(hp._hf_model(hp._base(preset)[2], cfg), str(out)).eval()
    diff = hp._max_diff(want, hp._torch(reference))
    loaded, trainable = hf_peft.load(out, cfg)
    back = hp._max_diff(want, hp._ptune(cfg, models.build(cfg, loaded.sites), _on_base(preset, trainable)))
    print(f"export {preset} {name} init={init}: max |logit diff| peft {diff:.2e}, reloaded in ptune {back:.2e}")
    assert diff < hp.TOL and back < hp.TOL


@pytest.mark.parametrize("preset", TINY)
def test_peft_dora_adapter_imports_with_matching_logits(preset):
    cfg, _, base_dir = hp._base(preset)
    torch.manual_seed(0)
    task = "SEQ_CLS" if cfg.num_labels else "CAUSAL_LM"
    model = peft.get_peft_model(hp._hf_model(base_dir, cfg), peft.LoraConfig(
        task_type=task, r=2, lora_alpha=6, use_dora=True, target_modules=TARGETS[preset]))
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p * (1 + 0.2 * torch.randn_like(p)) if "magnitude" in param_name else 0.3 * torch.randn_like(p))
    out = hp._TMP / f"peft-dora-{preset}"
    model.eval().save_pretrained(str(out))
    method, trainable = hf_peft.load(out, cfg)
    assert method.sites.names() == ["dora"] and len(_layers(trainable, "dora_m")) > 2
    ours = models.build(cfg, method.sites)
    diff = hp._max_diff(hp._ptune(cfg, ours, _on_base(preset, trainable)), hp._torch(model))
    print(f"import {preset} dora: max |logit diff| {diff:.2e}")
    assert diff < hp.TOL


@pytest.mark.parametrize("preset,name,init", [("gpt2-tiny", "dora", "random"), ("llama-tiny", "dora", "random"),
                                              ("llama-tiny", "lora", "pissa")])
def test_merged_loads_in_transformers(preset, name, init):
    cfg, method, model, params = _trained(preset, name, rank=2, targets=TARGETS[preset], init=init)
    out = hf_peft.save_pretrained_merged(hp._TMP / f"merged-{preset}-{name}-{init}", params, model)
    merged, left = hf_peft.merge(params, model)
    assert left == models.Sites() and not any(sites.is_site(p) for p in partition.flatten(merged))
    diff = hp._max_diff(hp._ptune(cfg, model, params), hp._torch(hp._hf_model(out, cfg)))
    print(f"merge {preset} {name} init={init}: max |logit diff| {diff:.2e}")
    assert diff < hp.TOL


# ------------------------------------------------------------------------------------------------ bank

@pytest.mark.slow   # ~30 s: four tasks' mixed batch, classified and generated
def test_bank_serves_dora_ranks_and_a_pissa_lora_beside_lora():
    """DoRA tasks of two ranks and alphas (padded, scale folded into B), a PiSSA-trained LoRA (folded to its
    rank-2r form) and a plain LoRA in one mixed batch, each as its own model computes it."""
    cfg, base = test_bank._base("gpt2-tiny")
    runs, adapters = test_bank._tasks(cfg, base, {
        "dora2": ("dora", {"rank": 2, "alpha": 3.0}, (65, 66)),
        "dora4": ("dora", {"rank": 4, "targets": ["c_attn", "c_fc"]}, (70, 71, 72)),
        "lora": ("lora", {"rank": 4}, (80, 81))})
    method = methods.get("lora", cfg, rank=2, init="pissa")
    model = models.build(cfg, method.sites)
    params = method.initialize(models.init(model, jax.random.key(0), pretrained=base),
                               InitContext(jax.random.key(1), cfg.family))
    trainable, frozen = partition.split(params, method.labels(params))
    params = partition.merge(frozen, jax.tree.map(lambda x: x * 1.5, trainable))
    runs["pissa"] = model, method, params, (90, 91)
    adapters["pissa"] = bank_lib.TaskAdapter.from_trained(method, model, params, (90, 91))
    assert adapters["pissa"].sites.lora == sites.LoRA(4, 32.0, method.sites.lora.targets)
    bank = bank_lib.Bank(cfg, base, adapters, capacity=5)
    assert bank.sites.names() == ["lora", "dora"] and bank.sites.dora.rank == 4
    test_bank._check_mixed_batch(bank, runs, ["dora2", "pissa", "dora4", "lora", "dora2"], test_bank.PROMPTS)
    unfolded = bank_lib.TaskAdapter(method.sites, trainable)
    with pytest.raises(ValueError, match="task 'raw': its lora is in training form"):
        bank_lib.Bank(cfg, base, {"raw": unfolded})


# ------------------------------------------------------------------------------------------- training

@pytest.mark.slow   # ~25 s each: a short run, a resume, an export
@pytest.mark.parametrize("name,options", [("dora", {}), ("lora", {"init": "pissa"})])
def test_short_run_learns_resumes_and_exports(make_config, tmp_path, name, options):
    """From the launcher's config (its method options read from the signature): the loss falls, a rerun
    resumes on the same frozen base (PiSSA's initial factors, recomputed, hash the same), and the exported
    adapter in `peft` on the base as loaded gives the trained model's logits."""
    from ptune.training import builder, checkpoint, train
    config = make_config(name, steps=8, rank=4, **options)
    assert {"rank", "alpha", "targets", "rslora", "dropout", "init"} <= set(config.method)
    config.task.update(name="synthetic_lm", options={"n_train": 64, "n_eval": 32})
    config.optim.learning_rate = 1e-2
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    train.train_and_evaluate(config, str(workdir))   # resumes at its last step: the base must match
    train_losses = [loss for _, split, loss, _ in losses(workdir) if split == "train"]
    assert len(train_losses) == 8 and np.mean(train_losses[-3:]) < np.mean(train_losses[:3]) - 0.1
    run = builder.setup(config, training=False)
    trained = partition.merge(checkpoint.load_adapter(workdir)[1], partition.split(run.params, run.labels)[1])
    cfg = run.model.config
    base = partition.unflatten({p: x for p, x in partition.flatten(run.params).items() if not sites.is_site(p)})
    base_dir = hf_peft.save_pretrained_merged(tmp_path / "base", base, models.build(cfg))
    adapter = hf_peft.export_workdir(workdir, tmp_path / "peft")
    reference = peft.PeftModel.from_pretrained(hp._hf_model(base_dir, cfg), str(adapter)).eval()
    diff = hp._max_diff(hp._ptune(cfg, run.model, trained), hp._torch(reference))
    print(f"trained {name} {options}: max |logit diff| in peft {diff:.2e}")
    assert diff < hp.TOL


# ------------------------------------------------------------------------------------------- bad options

@pytest.mark.parametrize("name,options,message", [
    ("lora", {"init": "svd"}, r"method lora: init='svd'; choose one of \('random', 'pissa', 'pissa_niter_<K>', "
                              r"'olora'\) \(PEFT's init_lora_weights\)"),
    ("dora", {"init": "pissa_niter_"}, "method dora: init='pissa_niter_'; choose one of"),
    ("lora", {"init": True}, "method lora: init=True; choose one of"),
    ("dora", {"rank": 0}, "method dora: rank=0 must be a positive integer"),
    ("dora", {"dropout": 1.0}, r"method dora: dropout=1.0 must be in \[0, 1\)"),
    ("ia3", {"init": "pissa"}, r"method 'ia3' has no option\(s\) \['init'\]"),
    ("dora", {"lr_ratio_b": 2.0}, r"method 'dora' has no option\(s\) \['lr_ratio_b'\]; its options are \['rank'"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, models.model_config("gpt2-tiny"), **options)

