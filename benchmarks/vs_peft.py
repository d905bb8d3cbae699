"""ptune against HF PEFT + transformers on PyTorch, on the same work (issue 8).

    pip install -e '.[bench]'
    python benchmarks/vs_peft.py [--shapes gpt2,smollm2-135m --methods full,lora,prompt,prefix,ia3
                                  --dtypes float32,bfloat16 --steps 5 --warmup 2 --remat none
                                  --out bench.json]

Same model shape (random weights: GPT-2 weights do not ship offline, and speed does not depend on
the values), batch 8 x 128 random tokens, next-token loss on every token, AdamW (lr 1e-4, no
weight decay), gradient clipping at 1.0, and the same method settings on both sides: LoRA r=8,
alpha 16 on PEFT's default targets (GPT-2 c_attn; LLaMA q_proj, v_proj), prompt tuning 20 tokens,
prefix tuning 20 tokens with PEFT's reparameterisation MLP (hidden 512), IA3 on PEFT's defaults.
bf16 is ptune's compute dtype (float32 parameters, bf16 matmuls) against torch.autocast(bfloat16).
`--remat` sets ptune's `model.remat` (PyTorch's steps keep every activation, transformers' default).

Every measurement is its own subprocess, so its peak resident memory (VmHWM, the whole process
from start to end) is its own; ptune and PyTorch alternate, one configuration after the other.
PyTorch gets 2 threads (this machine's cores) and glibc malloc tuned as the issue measured it
(up to 2x faster). Columns: median step seconds over --steps steps after --warmup steps, tokens/s,
peak RSS (and XLA's temp buffers of ptune's compiled step), adapter bytes on disk (ptune: the
adapter artifact of a checkpoint, trainable + metadata; PEFT: save_pretrained), first-step seconds
(ptune's includes compiling), the step's matmul FLOPs from the shape (`step_flops`; XLA's own count
of the compiled step beside it, which counts a loop body once, so the LM loss's scan over chunks
counts for one chunk), and model FLOP
utilisation: those FLOPs over the step time, divided by JAX's matmul peak in the row's dtype,
which this script measures first in the same run (`peak`). Generation: tokens/s at batch 1 and
8, greedy, KV-cached, 32-token prompts and 64 new tokens, for a prompt-tuned and a LoRA model.

A measurement that fails or runs past --timeout is reported and the run goes on (exit 1 at the
end, naming it); its row shows the other side's numbers and '-' for the missing ones. On a CPU
without bf16 instructions PyTorch's autocast bf16 takes minutes per step: `--reference-bf16 lora`
measures it for LoRA only, the other bf16 rows for ptune alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ptune import cli  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

BATCH, LENGTH, VIRTUAL = 8, 128, 20
PROMPT_LEN, NEW_TOKENS = 32, 64
LR = 1e-4
METHODS = ["full", "lora", "prompt", "prefix", "ia3"]
SHAPES = ["gpt2", "smollm2-135m"]
DTYPES = ["float32", "bfloat16"]
# The measurement of PyTorch on this kind of machine (its malloc tuning made it up to 2x faster).
TORCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TOP_PAD_": "1073741824",
             "MALLOC_TRIM_THRESHOLD_": "68719476736", "OMP_NUM_THREADS": "2"}


def peak_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of `steps` calls after `warmup` calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


# ------------------------------------------------------------------------------------------ FLOPs

def step_flops(shape: str, method: str) -> float:
    """Matmul FLOPs of one training step: per token, 2N forward, 2N for the activation gradients
    and 2N more for the weight gradients when the base trains (N = the weight matrices' parameters,
    the tied LM head included), plus attention (scores and mixing, 4 S d per layer forward, twice
    that backward). Prompt tuning adds its 20 positions to every sequence, prefix tuning 20 keys."""
    from ptune.models import model_config
    c = model_config(shape)
    d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    mlp = (3 if c.family == "llama" else 2) * d * c.intermediate_size
    n = c.num_layers * (2 * d * d + 2 * d * kv + mlp) + d * c.vocab_size
    tokens = LENGTH + (VIRTUAL if method == "prompt" else 0)
    keys = tokens + (VIRTUAL if method == "prefix" else 0)
    attention = c.num_layers * 4 * keys * d
    per_token = (6 if method == "full" else 4) * n + 3 * attention
    return BATCH * tokens * per_token


def peak() -> dict:
    """Matmul GFLOP/s, JAX and PyTorch, median of 10 after warm-up, for square sizes, in f32 and
    in bf16 (JAX: bf16 operands accumulated in f32, as ptune's bf16 compute multiplies)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    torch.set_num_threads(2)
    out = {}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[dtype] = {}
        for n in (1024, 2048, 4096):
            a = np.random.default_rng(0).standard_normal((n, n), np.float32)
            x = jnp.asarray(a, dtype)
            f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
            _, s = timed(lambda: f(x).block_until_ready(), 10, 2)
            t = torch.from_numpy(a).to(torch_dtype)
            _, ts = timed(lambda: t @ t, 10, 2)
            out[dtype][n] = {"jax_gflops": 2 * n ** 3 / s / 1e9, "torch_gflops": 2 * n ** 3 / ts / 1e9}
    return out


def step_dots(shape: str) -> list[dict]:
    """f32 GFLOP/s, JAX and PyTorch, of the products a training step of `shape` is made of:
    for each weight shape (k, n) and M = batch x length tokens, the forward x @ W, the input
    gradient dy @ W^T and the weight gradient x^T @ dy (the transposes left to the library,
    as in a step). Medians of 10 after 2. Tells whether a step-time gap is in the matmuls."""
    import jax
    import numpy as np
    import torch

    from ptune.models import model_config
    torch.set_num_threads(2)
    c = model_config(shape)
    d, kv, m = c.hidden_size, c.num_kv_heads * c.head_dim, BATCH * LENGTH
    weights = {"gpt2": [(d, 3 * d), (d, d), (d, c.intermediate_size), (c.intermediate_size, d)],
               "llama": [(d, d), (d, kv), (d, c.intermediate_size), (c.intermediate_size, d)]}[c.family]
    weights.append((d, c.vocab_size))
    contract = {"forward": ((1,), (0,)), "input grad": ((1,), (1,)), "weight grad": ((0,), (0,))}
    torch_ops = {"forward": lambda a, b: a @ b, "input grad": lambda a, b: a @ b.T,
                 "weight grad": lambda a, b: a.T @ b}
    out = []
    for k, n in weights:
        rng = np.random.default_rng(0)
        x, w, dy = (rng.standard_normal(s, np.float32) for s in ((m, k), (k, n), (m, n)))
        operands = {"forward": (x, w), "input grad": (dy, w), "weight grad": (x, dy)}
        for kind, (a, b) in operands.items():
            f = jax.jit(lambda a, b, dims=contract[kind]: jax.lax.dot_general(a, b, (dims, ((), ()))))
            ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
            _, s = timed(lambda: f(ja, jb).block_until_ready(), 10, 2)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            _, ts = timed(lambda: torch_ops[kind](ta, tb), 10, 2)
            flops = 2 * m * k * n
            out.append({"weight": f"{k}x{n}", "product": kind, "jax_gflops": flops / s / 1e9,
                        "torch_gflops": flops / ts / 1e9})
    return out


# ------------------------------------------------------------------------------------------ ptune

def ptune_setup(shape: str, method: str, dtype: str, remat: str = "none"):
    from ptune.config import base_config, with_method
    from ptune.training import builder
    config = with_method(base_config(), method)
    config.model.update(preset=shape, dtype=dtype, remat=remat)
    config.task.update(name="synthetic_lm", options={"n_train": 8, "n_eval": 8}, max_length=LENGTH)
    config.optim.learning_rate = LR
    config.train.update(steps=1, batch_size=BATCH, progress=False)
    config.checkpoint.every_steps = 1
    return builder.setup(config)


def ptune_step(shape: str, method: str, dtype: str, remat: str = "none"):
    """(run, compiled train step, state, one, compile seconds): ptune's real training step on one
    batch of random tokens, its blocks rematerialised as `remat` (a `model.remat` policy) says;
    one() runs it once and keeps the new [trainable, optimizer state] in `state` (the step donates
    the old)."""
    import jax
    import numpy as np

    from ptune import partition
    from ptune.training import compute
    run = ptune_setup(shape, method, dtype, remat)
    ids = np.random.default_rng(0).integers(0, run.model.config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    trainable, frozen = partition.split(run.params, run.labels)
    state = [trainable, run.tx.init(trainable)]
    t0 = time.perf_counter()
    step = compute.make_train_step(run).lower(*state, frozen, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0

    def one():
        *state[:], metrics = step(*state, frozen, batch, jax.random.key(0))
        jax.block_until_ready(metrics)
    return run, step, state, one, compile_s


def ptune_train(shape: str, method: str, dtype: str, steps: int, warmup: int, remat: str) -> dict:
    from ptune.training import checkpoint, compute
    run, step, state, one, compile_s = ptune_step(shape, method, dtype, remat)
    trainable_count = run.summary.trainable   # before the step donates run.params' arrays
    tmp = tempfile.TemporaryDirectory()
    checkpoints = checkpoint.Checkpoints(tmp.name, run, compute.dropout_key(0))   # reads run.params: before donation
    first, median = timed(one, steps, warmup)
    saved = checkpoints.save(1, *state)
    checkpoints.close()
    tmp.cleanup()
    return {"step_s": median, "first_step_s": first + compile_s, "compile_s": compile_s, "peak_rss": peak_rss_bytes(),
            "adapter_bytes": saved["adapter_bytes"], "trainable": trainable_count,
            "xla_flops": step.cost_analysis().get("flops", float("nan")),
            "xla_temp_bytes": step.memory_analysis().temp_size_in_bytes}


def ptune_generate(shape: str, method: str, batch: int, steps: int) -> dict:
    import numpy as np

    from ptune.inference import generate
    run = ptune_setup(shape, method, "float32")
    prompts = np.random.default_rng(0).integers(0, run.model.config.vocab_size, (batch, PROMPT_LEN)).tolist()
    go = lambda: generate.generate(run.model, run.params, prompts, NEW_TOKENS, eos_id=-1, pad_id=0)
    first, median = timed(go, steps, 1)
    return {"tokens_per_s": batch * NEW_TOKENS / median, "first_s": first, "peak_rss": peak_rss_bytes()}


# ------------------------------------------------------------------------------------------ PyTorch

def torch_model(shape: str, method: str):
    """transformers' model of `shape` with PEFT's `method` applied; random weights, no dropout."""
    import peft
    import torch
    import transformers

    from ptune.models import DEFAULT_TARGETS, model_config, pretrained
    torch.manual_seed(0)
    cfg = model_config(shape)
    hf = pretrained.config_to_hf(cfg)   # the conversion ptune's own exports use
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if cfg.family == "gpt2" else {}
    model = getattr(transformers, hf["architectures"][0])(transformers.AutoConfig.for_model(**hf, **no_dropout))
    targets = DEFAULT_TARGETS[cfg.family]["lora"]
    kinds = {
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                        target_modules=targets, fan_in_fan_out=cfg.family == "gpt2"),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL,
                                                  prefix_projection=True, encoder_hidden_size=512),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
    }
    return model if method == "full" else peft.get_peft_model(model, kinds[method]())


def torch_train(shape: str, method: str, dtype: str, steps: int, warmup: int, remat: str) -> dict:
    # `remat` is ptune's knob; the reference keeps its default (no gradient checkpointing).
    import contextlib

    import numpy as np
    import torch
    torch.set_num_threads(2)
    model = torch_model(shape, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (BATCH, LENGTH)))
    mask = torch.ones_like(ids)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext

    def one():
        with autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    first, median = timed(one, steps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = du(tmp)
    return {"step_s": median, "first_step_s": first, "peak_rss": peak_rss_bytes(), "adapter_bytes": size,
            "trainable": sum(p.numel() for p in params)}


def torch_generate(shape: str, method: str, batch: int, steps: int) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(2)
    model = torch_model(shape, method).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, PROMPT_LEN)))

    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                    pad_token_id=0)

    def go():
        with torch.inference_mode():
            if method == "prompt":
                # PEFT's own generate re-inserts the virtual tokens at every decoding step under
                # transformers 5 (positions overflow: IndexError in wpe), so this does what its
                # first step does: the prompt's embeddings before the tokens', then transformers'
                # KV-cached generate on those embeddings.
                embeds = torch.cat((model.get_prompt(batch_size=batch), model.word_embeddings(ids)), 1)
                model.get_base_model().generate(inputs_embeds=embeds, **settings,
                                                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
            else:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    first, median = timed(go, steps, 1)
    return {"tokens_per_s": batch * NEW_TOKENS / median, "first_s": first, "peak_rss": peak_rss_bytes()}


# ------------------------------------------------------------------------------------------ driver

CHILDREN = {"ptune:train": ptune_train, "torch:train": torch_train,
            "ptune:generate": ptune_generate, "torch:generate": torch_generate}


def child(args, kind: str, *spec) -> dict:
    """Run one measurement in a fresh process and return its JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(TORCH_ENV if kind.startswith("torch") else {})}
    cmd = [sys.executable, __file__, f"--steps={args.steps}", f"--warmup={args.warmup}", f"--remat={args.remat}",
           "--child=" + ":".join((kind, *map(str, spec)))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{' '.join(cmd[2:])} ran past --timeout {args.timeout:g} s and was stopped") from None
    if proc.returncode:
        raise ChildFailed(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}): "
                          f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ChildFailed(RuntimeError):
    """A measurement's process failed; the driver reports it in its row and goes on."""


def both(args, what: str, spec: tuple, failed: list, reference: bool = True) -> tuple[dict | None, dict | None]:
    """(ptune, PyTorch) measurements of `what` for `spec`; either is None when it failed (the
    error is kept in `failed`) and PyTorch's is None when `reference` is false."""
    out = []
    for framework in ("ptune", "torch")[:1 + reference]:
        try:
            out.append(child(args, f"{framework}:{what}", *spec))
        except ChildFailed as e:
            failed.append(str(e))
            print(f"failed: {e}", flush=True)
            out.append(None)
    return out[0], (out[1] if reference else None)


def table_row(columns: list, record: dict) -> str:
    """A markdown row of `columns` ((header, sides, cell(record)) each) for one result record:
    '-' where a side the cell needs ("p" ptune, "t" PyTorch) is None: it failed or was not measured."""
    have = {"p": record["ptune"] is not None, "t": record["torch"] is not None}
    return "| " + " | ".join(cell(record) if all(have[s] for s in sides) else "-" for _, sides, cell in columns) + " |"


def table_header(columns: list) -> str:
    return "| " + " | ".join(h for h, _, _ in columns) + " |\n|" + "---|" * len(columns)


def run_child(spec: str, steps: int, warmup: int, remat: str) -> dict:
    if spec == "peak":
        return peak()
    if spec.startswith("dots:"):
        return step_dots(spec.split(":")[1])
    framework, what, *rest = spec.split(":")
    fn = CHILDREN[f"{framework}:{what}"]
    if what == "train":
        return fn(*rest, steps, warmup, remat)
    return fn(rest[0], rest[1], int(rest[2]), steps)


def main():
    from ptune.models.model_config import REMAT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default=",".join(METHODS), help="methods whose training is measured ('' = none)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--generate", default="lora,prompt", help="methods whose generation is measured ('' = none)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (or generations) after warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    ap.add_argument("--reference-bf16", default=",".join(METHODS),
                    help="methods whose PyTorch autocast bf16 step is measured beside ptune's bf16 one ('' = none; "
                         "on a CPU without bf16 instructions PyTorch takes minutes per step)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take before it is "
                    "stopped and reported as failed")
    ap.add_argument("--remat", default="none", choices=REMAT,
                    help="ptune's model.remat policy for the training steps (PyTorch's steps keep none)")
    ap.add_argument("--dots", action="store_true", help="also time each shape's step matmuls, JAX vs PyTorch")
    ap.add_argument("--out", default="", help="also write every measurement to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.warmup, args.remat)))
        return
    shapes, methods, dtypes, generate, reference_bf16 = ([x for x in flag.split(",") if x] for flag in (
        args.shapes, args.methods, args.dtypes, args.generate, args.reference_bf16))
    for flag, given, valid in (("shapes", shapes, SHAPES), ("methods", methods, METHODS), ("dtypes", dtypes, DTYPES),
                               ("generate", generate, METHODS), ("reference-bf16", reference_bf16, METHODS)):
        if unknown := sorted(set(given) - set(valid)):
            ap.error(f"--{flag}: unknown {unknown}; choose from {valid}")
    if args.timeout <= 0:
        ap.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.steps < 5 or args.warmup < 1:
        ap.error("--steps must be >= 5 and --warmup >= 1 (medians of at least 5 steps after warm-up)")
    if args.out and os.path.exists(args.out):
        ap.error(f"--out {args.out} exists; give a new file name")

    try:   # without a peak there is no MFU: stop here (a training or generation failure goes on)
        results = {"peak": child(args, "peak")}
    except ChildFailed as e:
        raise SystemExit(f"the matmul peak could not be measured: {e}") from None
    best = {dtype: max(r["jax_gflops"] for r in sizes.values()) for dtype, sizes in results["peak"].items()}
    for dtype, sizes in results["peak"].items():
        print(f"{dtype} matmul GFLOP/s, n x n @ n x n: " + ", ".join(
            f"n={n} JAX {r['jax_gflops']:.0f} / torch {r['torch_gflops']:.0f}" for n, r in sizes.items())
            + f"; JAX's best, the MFU's peak: {best[dtype]:.0f}", flush=True)
    if args.dots:
        results["dots"] = {}
        print("| shape | weight | product | JAX GFLOP/s | PyTorch GFLOP/s | JAX / PyTorch |\n|---|---|---|---|---|---|")
        for shape in shapes:
            try:
                results["dots"][shape] = child(args, f"dots:{shape}")
            except ChildFailed as e:
                raise SystemExit(f"--dots for {shape}: {e}") from None
            for r in results["dots"][shape]:
                print(f"| {shape} | {r['weight']} | {r['product']} | {r['jax_gflops']:.0f} | {r['torch_gflops']:.0f} | "
                      f"{r['jax_gflops'] / r['torch_gflops']:.2f} |", flush=True)
    print(f"batch {BATCH} x {LENGTH}, median of {args.steps} steps after {args.warmup}, ptune's remat "
          f"{args.remat}; ratio = ptune / PEFT")
    ratio = lambda key: lambda r: f"{r['ptune'][key] / r['torch'][key]:.2f}"
    field = lambda key: lambda r: str(r[key])
    train_columns = [
        ("shape", "", field("shape")), ("dtype", "", field("dtype")), ("method", "", field("method")),
        ("ptune s", "p", lambda r: f"{r['ptune']['step_s']:.2f}"),
        ("PEFT s", "t", lambda r: f"{r['torch']['step_s']:.2f}"), ("ratio", "pt", ratio("step_s")),
        ("ptune tok/s", "p", lambda r: f"{BATCH * LENGTH / r['ptune']['step_s']:.0f}"),
        ("ptune GB (XLA temp)", "p",
         lambda r: f"{r['ptune']['peak_rss'] / 2**30:.2f} ({r['ptune']['xla_temp_bytes'] / 2**30:.2f})"),
        ("PEFT GB", "t", lambda r: f"{r['torch']['peak_rss'] / 2**30:.2f}"), ("ratio", "pt", ratio("peak_rss")),
        ("ptune kB", "p", lambda r: f"{r['ptune']['adapter_bytes'] / 1e3:,.0f}"),
        ("PEFT kB", "t", lambda r: f"{r['torch']['adapter_bytes'] / 1e3:,.0f}"),
        ("ptune 1st s (compile)", "p", lambda r: f"{r['ptune']['first_step_s']:.1f} ({r['ptune']['compile_s']:.1f})"),
        ("PEFT 1st s", "t", lambda r: f"{r['torch']['first_step_s']:.1f}"),
        ("GFLOP (XLA's)", "p", lambda r: f"{r['flops'] / 1e9:.0f} ({r['ptune']['xla_flops'] / 1e9:.0f})"),
        ("MFU", "p", lambda r: f"{r['mfu']:.0%}")]
    print(table_header(train_columns), flush=True)
    results["train"], failed = [], []
    for shape in shapes:
        for dtype in dtypes:
            for method in methods:
                reference = dtype != "bfloat16" or method in reference_bf16
                p, t = both(args, "train", (shape, method, dtype), failed, reference)
                flops = step_flops(shape, method)
                results["train"].append({"shape": shape, "dtype": dtype, "method": method, "ptune": p, "torch": t,
                                         "flops": flops, "mfu": p and flops / p["step_s"] / (best[dtype] * 1e9)})
                print(table_row(train_columns, results["train"][-1]), flush=True)
    if generate:
        print(f"\ngeneration, f32, greedy, {PROMPT_LEN}-token prompts + {NEW_TOKENS} new tokens, KV cache; "
              f"median of {args.steps} after 1")
        generate_columns = [
            ("shape", "", field("shape")), ("method", "", field("method")), ("batch", "", field("batch")),
            ("ptune tok/s", "p", lambda r: f"{r['ptune']['tokens_per_s']:.0f}"),
            ("PEFT tok/s", "t", lambda r: f"{r['torch']['tokens_per_s']:.0f}"), ("ratio", "pt", ratio("tokens_per_s")),
            ("ptune 1st s", "p", lambda r: f"{r['ptune']['first_s']:.1f}")]
        print(table_header(generate_columns))
        results["generate"] = []
        for shape in shapes:
            for method in generate:
                for b in (1, 8):
                    p, t = both(args, "generate", (shape, method, b), failed)
                    results["generate"].append({"shape": shape, "method": method, "batch": b, "ptune": p, "torch": t})
                    print(table_row(generate_columns, results["generate"][-1]), flush=True)
    if args.out:
        with open(args.out, "x") as f:
            json.dump(results | {"remat": args.remat, "failed": failed}, f, indent=1)
    if failed:
        raise SystemExit(f"{len(failed)} measurement(s) failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
