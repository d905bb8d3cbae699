"""Memory and precision knobs: bf16 compute, a bf16 frozen base, per-block remat.

Each knob is compared with the plain float32 model on the same parameters and batch.
"""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import methods, models, partition
from ptune.data import batching
from ptune.training import builder, compute, objectives

FAMILIES = ["gpt2-tiny", "llama-tiny", "bert-tiny"]
# Every site at once (LoRA, IA3, adapters, soft prompt, prefix), so one model per family
# exercises what the methods lora, ia3, adapter, prompt and prefix add to full fine-tuning's base.
ALL_SITES = "lora+ia3+adapter+prompt+prefix"
# bf16 keeps 8 significant bits (relative rounding <= 2^-9); through two blocks and the loss
# the measured differences are below 1e-3 (losses: LM ~5.6, classification ~0.7).
BF16_LOSS_TOL = 1e-2


@functools.cache
def tiny(preset: str):
    """(model, params, batch, objective) for `preset` with every site and dropout 0.1 in the blocks
    and in LoRA. Parameters are N(0, 0.05), scales (norms, IA3) 1 + N(0, 0.05): no site is the
    identity, so each one changes the output. Shared by the tests below; never mutated."""
    cfg = models.model_config(preset, dropout=0.1, num_labels=2)
    sites = methods.get(ALL_SITES, cfg, lora={"dropout": 0.1}, prompt={"length": 4},
                        prefix={"length": 4, "hidden": 32}).sites
    model = models.build(cfg, sites)
    rng = np.random.default_rng(0)
    draw = lambda path, s: (path.endswith(("scale", "ia3")) + 0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
    params = partition.unflatten({p: draw(p, s) for p, s in
                                  partition.flatten(nn.unbox(models.abstract_params(model))).items()})
    ids = rng.integers(3, cfg.vocab_size, (4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, -5:] = 0   # one padded row
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask, "labels": np.array([0, 1, 1, 0])}
    return model, params, batch, "lm" if cfg.causal else "head"


def variant(model, **fields):
    """`model` rebuilt with other ModelConfig fields (same sites, so the same parameters fit)."""
    return models.build(dataclasses.replace(model.config, **fields), model.sites)


def loss_fn(model, batch, objective, rng=None):
    """params -> loss; with dropout when `rng` is given."""
    return lambda params: objectives.loss(model, params, batch, objective, rng=rng, deterministic=rng is None)[0]


def float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@functools.cache
def f32_loss(preset: str) -> float:
    model, params, batch, objective = tiny(preset)
    return float(jax.jit(loss_fn(model, batch, objective))(params))


@pytest.mark.parametrize("preset", FAMILIES)
def test_bf16_compute_loss_close_to_f32(preset):
    model, params, batch, objective = tiny(preset)
    f32 = f32_loss(preset)
    bf16 = float(jax.jit(loss_fn(variant(model, dtype="bfloat16"), batch, objective))(params))
    assert bf16 != f32, "bf16 changed nothing: is the compute dtype used?"
    assert abs(bf16 - f32) < BF16_LOSS_TOL, (f32, bf16)


@pytest.mark.parametrize("preset", FAMILIES)
def test_bf16_compute_runs_every_matmul_in_bf16(preset):
    """Linear with LoRA and IA3, adapters, attention and the LM head: no float32 matmul is left. The
    prefix MLP (batch-independent) and the task head are float32 by design, so they are left out."""
    model, _, batch, _ = tiny(preset)
    model = models.build(dataclasses.replace(model.config, dtype="bfloat16", num_labels=0),
                         dataclasses.replace(model.sites, prefix=None))
    output = "logits" if model.config.causal else "hidden"
    forward = lambda p: model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], output=output)
    hlo = jax.jit(forward).lower(nn.unbox(models.abstract_params(model))).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    # Per block at least: 3 or 4 projections + 3 (LLaMA: 4) MLP/output matmuls, LoRA's two on each of
    # its targets, 2 attention einsums and 2 per adapter.
    assert len(dots) >= 12 * model.config.num_layers, len(dots)
    assert not [d for d in dots if re.search(r"\(tensor<[^)]*f32>", d)], "a matmul is computed in float32"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_bf16_products_accumulate_in_f32_in_both_passes(preset):
    """Every product of a bf16 training step, forward and backward, multiplies bf16 operands into a
    float32 result (`layers.contract`): JAX's own backward would mix a float32 cotangent with a bf16
    operand, which XLA:CPU runs as a float32 product, ~5x slower on AMX. The gradients stay close
    to float32's."""
    model, _, batch, _ = tiny(preset)   # without the prefix, whose MLP is float32 by design
    model = models.build(model.config, dataclasses.replace(model.sites, prefix=None))
    params = models.init(model, jax.random.key(0))

    def grads(model):
        logits = lambda p: model.apply({"params": p}, batch["input_ids"], batch["attention_mask"])
        return jax.grad(lambda p: jnp.sum(jnp.tanh(logits(p).astype(jnp.float32))))
    bf16 = variant(model, dtype="bfloat16")
    hlo = jax.jit(grads(bf16)).lower(params).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) >= 3 * 12 * model.config.num_layers, len(dots)   # forward, input and weight gradients
    operands = [re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", d).groups() for d in dots]
    wrong = [o for o in operands if not (o[0].endswith("bf16>") and o[1].endswith("bf16>") and o[2].endswith("f32>"))]
    assert not wrong, wrong[:3]
    got, want = (partition.flatten(jax.jit(grads(m))(params)) for m in (bf16, model))
    for path, g in got.items():
        assert np.abs(g - want[path]).max() <= 0.05 * np.abs(want[path]).max() + 1e-6, path


def test_bf16_compute_over_a_bf16_frozen_base_trains_in_f32(make_config):
    """The low-memory setting: frozen leaves stored in bf16, bf16 compute, and float32 trainable
    parameters and optimizer state, through `builder.setup` and one training step."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = make_config("lora+prompt", "llama-tiny")
        config.model.update(dtype=dtype, frozen_dtype=dtype)
        runs[dtype] = builder.setup(config)
    run, reference = runs["bfloat16"], runs["float32"]
    trainable, frozen = partition.split(run.params, run.labels)
    assert float_dtypes(frozen) == {"bfloat16"} and float_dtypes(trainable) == {"float32"}
    assert run.summary.bytes["frozen"] * 2 == reference.summary.bytes["frozen"]
    assert run.summary.trainable_bytes == reference.summary.trainable_bytes

    batch = batching.batch_at(run.data["train"], 0, 4, 0)
    trainable, opt_state, metrics = compute.make_train_step(run)(trainable, run.tx.init(trainable), frozen, batch,
                                                               jax.random.key(0))
    assert float_dtypes(trainable) == {"float32"} and float_dtypes(opt_state) == {"float32"}
    loss = float(metrics["loss_sum"] / metrics["count"])   # the loss before the update
    loss_f32 = float(jax.jit(lambda p: objectives.loss(reference.model, p, batch, reference.objective,
                                                       reference.label_ids)[0])(reference.params))
    assert loss != loss_f32 and abs(loss - loss_f32) < BF16_LOSS_TOL, (loss_f32, loss)


@functools.cache
def loss_and_grads(preset: str, remat: str):
    """Loss and gradients w.r.t. every parameter, with dropout, for tiny(preset) with `remat`."""
    model, params, batch, objective = tiny(preset)
    model = variant(model, remat=remat)
    return model, jax.jit(jax.value_and_grad(loss_fn(model, batch, objective, jax.random.key(2))))(params)


@pytest.mark.parametrize("preset", FAMILIES)
def test_remat_same_paths_loss_and_grads(preset):
    plain, (loss, grads) = loss_and_grads(preset, "none")
    model, (remat_loss, remat_grads) = loss_and_grads(preset, "full")
    # Same paths and shapes, so LoRA targets, labels and HF names hold with remat on.
    shapes = lambda m: jax.tree.map(lambda s: s.shape, nn.unbox(models.abstract_params(m)))
    assert shapes(model) == shapes(plain)
    assert abs(float(remat_loss) - float(loss)) <= 1e-6
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, remat_grads)
    assert max(jax.tree.leaves(diff)) <= 1e-6, diff
    # Dropout changed the loss, so equal gradients mean the recomputation replayed its masks.
    assert f32_loss(preset) != float(loss)


def test_remat_policy_decides_what_the_backward_pass_recomputes():
    model, params, batch, objective = tiny("gpt2-tiny")
    dots = lambda remat: jax.jit(jax.grad(loss_fn(variant(model, remat=remat), batch, objective))).lower(
        params).as_text().count("dot_general")
    plain = dots("none")
    assert dots("full") > plain              # the blocks' matmuls run again in the backward pass
    assert dots("dots_saveable") == plain    # matmul outputs are kept: only cheap ops are recomputed


@pytest.mark.parametrize("key,value", [("dtype", "float16"), ("frozen_dtype", "bf16"), ("remat", "yes")])
def test_unknown_precision_setting_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"model\.{key}='{value}'; choose one of"):
        models.model_config("gpt2-tiny", **{key: value})


def test_remat_lowers_a_cpu_training_steps_memory(make_config):
    """XLA's memory for one compiled LoRA step of a 6-layer model, with and without remat. On CPU
    this needs the scheduler ptune's import selects (ptune/__init__.py): under XLA's default one,
    `full` saved 10% here (and 11% on SmolLM2); under ptune's it saves 25% (and 46%)."""
    temp = {}
    for remat in ("none", "full"):
        config = make_config("lora", "llama-tiny")
        config.model.update(remat=remat, num_layers=6)
        config.train.batch_size = 8
        run = builder.setup(config)
        trainable, frozen = partition.split(run.params, run.labels)
        batch = batching.batch_at(run.data["train"], 0, 8, 0)
        step = compute.make_train_step(run).lower(trainable, run.tx.init(trainable), frozen, batch,
                                                jax.random.key(0)).compile()
        temp[remat] = step.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.85 * temp["none"], temp


def test_importing_ptune_changes_no_environment_and_the_launchers_flag_is_reported_when_late(tmp_path):
    """`import ptune` leaves XLA_FLAGS alone; the launchers' set_xla_flags only counts before JAX's first
    backend starts: it says so, and how to fix it; a user's own setting of the flag wins."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    python = lambda code: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         cwd=tmp_path)
    done = python("import os, ptune, ptune.api; print(os.environ.get('XLA_FLAGS'))")
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    done = python("import jax; jax.devices(); from ptune import cli; cli.set_xla_flags()")
    assert done.returncode == 0 and "call it first" in done.stderr, done.stderr
    env["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=true"   # the user's choice wins
    done = python("import jax; jax.devices(); from ptune import cli; cli.set_xla_flags(); import os; "
                  "print(os.environ['XLA_FLAGS'])")
    assert done.stdout.strip() == env["XLA_FLAGS"] and "call it first" not in done.stderr, done.stderr
    env["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=true"   # the user's choice wins
    done = python("import jax; jax.devices(); import ptune, os; print(os.environ['XLA_FLAGS'])")
    assert done.stdout.strip() == env["XLA_FLAGS"] and "import ptune first" not in done.stderr, done.stderr
