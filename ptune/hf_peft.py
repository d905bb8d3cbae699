"""HF PEFT adapters out and in, and LoRA/IA3 merged into a plain HF checkpoint.

    export("out/adapter", params, method, model_config)     # adapter_config.json + adapter_model.safetensors
    method, trainable = load("out/adapter", model_config)   # then partition.merge(trainable, frozen base)
    save_pretrained_merged("out/merged", params, model)     # config.json + model.safetensors, LoRA/IA3 folded in
    export_workdir("/tmp/run", "/tmp/run/peft")             # a trained run's checkpoint (scripts/export.py)
    export_base("model.gguf", "out/base")                   # a GGUF as a transformers directory

An adapter directory is what `peft.PeftModel.from_pretrained(hf_model, dir)` reads, for the
`*ForCausalLM` / `*ForSequenceClassification` model of the same base. Supported: LoRA
(`r`, `lora_alpha`, `use_rslora`), IA3, prompt tuning and prefix tuning (saved, as PEFT
does, in the direct form: one (num_virtual_tokens, num_layers * 2 * kv_dim) table), plus a
trained task head as `modules_to_save`. PEFT applies prefixes through `past_key_values`,
which transformers' BERT does not take, so BERT prefix adapters are refused both ways.
Every write goes to a temporary directory renamed into place: a failure leaves nothing.

`base_model_name_or_path` names a directory `AutoModelForCausalLM.from_pretrained` loads: the
run's HF checkpoint directory, or for a GGUF checkpoint its dequantized transformers form,
written once beside the file (`<file>.hf/`, like the tokenizer's `<file>.tokenizer/`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile

import flax.linen as nn
import numpy as np

from ptune import assets, methods, models, partition
from ptune.methods import head
from ptune.models import checkpoints, hf
from ptune.models.config import ModelConfig
from ptune.models.sites import Sites

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
HEAD = re.compile(head.HEAD)
HEAD_KEY = re.compile(r"(classifier|score)\.(weight|bias)")   # a head in modules_to_save, not a LoRA on it
# PEFT prefixes every key with the path of the transformers model inside its PeftModel.
TUNER_PREFIX, PROMPT_PREFIX = "base_model.model.", "base_model."
# adapter_config.json keys ptune reads or that do not change the loaded model (bookkeeping, init
# schemes). Any other key must be off (None, False, {}, []): ptune cannot honour it. Which layers
# carry LoRA/IA3 is read from the weight file's keys, so the options that select layers
# (target_modules, layers_to_transform, exclude_modules...) are honoured whatever they say.
UNDERSTOOD = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
              "auto_mapping", "modules_to_save", "target_modules", "exclude_modules", "fan_in_fan_out",
              "layers_to_transform", "layers_pattern"}
UNDERSTOOD_BY_TYPE = {
    "LORA": {"r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "init_lora_weights", "megatron_core",
             "qalora_group_size"},
    "IA3": {"feedforward_modules", "init_ia3_weights"},
    "PROMPT_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                      "tokenizer_kwargs"},
    "PREFIX_TUNING": {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers", "encoder_hidden_size", "prefix_projection", "init_weights"},
}
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
# LoRA initialisations that leave the base weights as they are; the others (PiSSA, OLoRA, CorDA,
# LoftQ...) subtract the initial adapter from the base, so their adapters need that changed base.
PLAIN_LORA_INITS = (True, False, "gaussian")


# ---------------------------------------------------------------------------------------------- export

def export(out_dir, params, method: methods.Method, model_config: ModelConfig, base_name: str | None = None):
    """Write `method`'s trained sites in `params` as a PEFT adapter directory `out_dir`.

    `params` is the whole tree (base + sites) of `models.build(model_config, method.sites)`.
    A trained task head goes in as `modules_to_save`. Returns the directory path.
    """
    cfg = model_config
    kind = _one_peft_kind(method.name, method.sites, cfg.family)
    params, sites = method.folded(params, models.build(cfg, method.sites))
    trained = [p for p, g in partition.flatten(method.labels(params)).items() if g != partition.FROZEN]
    base = [p for p in trained if not (hf.is_site(p) or HEAD.search(p))]
    if base:
        raise ValueError(f"method {method.name!r} trains base weights (e.g. {base[0]}), which a PEFT adapter "
                         "cannot hold; write the whole model with save_pretrained_merged instead")
    flat = partition.flatten(params)
    task_type = "SEQ_CLS" if cfg.num_labels else "CAUSAL_LM" if cfg.causal else "FEATURE_EXTRACTION"
    config = {"peft_type": PEFT_TYPES[kind], "task_type": task_type, "base_model_name_or_path": base_name,
              "inference_mode": True}
    if kind in ("prompt", "prefix"):
        prefix, tensors = PROMPT_PREFIX, {"prompt_embeddings": _prompt_table(kind, flat, cfg)}
        config.update(num_virtual_tokens=getattr(sites, kind).length, num_layers=cfg.num_layers,
                      num_transformer_submodules=1)
        if kind == "prompt":
            config.update(token_dim=cfg.hidden_size, num_attention_heads=cfg.num_heads, prompt_tuning_init="RANDOM")
        else:   # PEFT's layout for grouped-query attention: heads and width of the keys/values
            kv_dim = cfg.num_kv_heads * cfg.head_dim
            config.update(token_dim=kv_dim, num_attention_heads=cfg.num_kv_heads, encoder_hidden_size=kv_dim,
                          prefix_projection=False)
    else:
        prefix, tensors = TUNER_PREFIX, {}
        for path, x in flat.items():
            if path.endswith(("/lora_a", "/lora_b")):
                tensors[hf.hf_key(path)] = np.asarray(x).T                 # PEFT's nn.Linear: (out, in)
            elif path.endswith("/ia3"):
                on_input = re.search(sites.ia3.feedforward, path.rpartition("/")[0])
                tensors[hf.hf_key(path)] = np.asarray(x).reshape((1, -1) if on_input else (-1, 1))
        layers = models.linear_layers(params)
        leaf = "lora_a" if kind == "lora" else "ia3"
        targeted = [m for m in layers if f"{m}/{leaf}" in flat]
        config.update(target_modules=_peft_names(targeted, layers),
                      fan_in_fan_out=cfg.family == "gpt2")   # GPT-2's Conv1D layers store (in, out)
        if kind == "lora":
            config.update(r=sites.lora.rank, lora_alpha=sites.lora.alpha, use_rslora=sites.lora.rslora,
                          lora_dropout=sites.lora.dropout, bias="none")
        else:
            on_input = [m for m in targeted if re.search(sites.ia3.feedforward, m)]
            config.update(feedforward_modules=_peft_names(on_input, layers))
    task_head = {p: flat[p] for p in trained if HEAD.search(p)}
    if task_head:
        tensors.update(hf.to_hf(cfg.family, partition.unflatten(task_head)))
        config["modules_to_save"] = [cfg.head_name]
    tensors = {(k if k == "prompt_embeddings" else prefix + k): np.ascontiguousarray(v, np.float32)
               for k, v in tensors.items()}
    return _write_dir(out_dir, {ADAPTER_CONFIG: config}, ADAPTER_WEIGHTS, tensors)


def export_workdir(workdir, out_dir, which: str | int = "latest", merge: bool = False, base=None):
    """A trained run's adapter checkpoint (`ptune.checkpoint`) as a PEFT adapter directory, or with
    `merge` as a transformers checkpoint with LoRA/IA3 merged in (plus the run's tokenizer files).
    The frozen base is rebuilt from the run's config, as training built it. The adapter's
    `base_model_name_or_path` is `base` (an HF directory, written as given), else `base_dir` of the
    run's checkpoint; a random-init preset has no loadable base, so its name is written and
    `how_to_load` says so (refusing would also refuse ptune's own `load` of the adapter).
    Returns the directory path."""
    from ptune import checkpoint, train
    _require_new_dir(pathlib.Path(out_dir))   # before minutes of loading, not after
    if base is not None:
        if merge:
            raise ValueError(f"base={base!r} names an adapter's base, but a merged checkpoint holds its own; "
                             "drop base or merge")
        if not (pathlib.Path(base) / "config.json").is_file():
            raise ValueError(f"base {base!r} has no config.json; pass a transformers model directory, e.g. one "
                             "written by `python scripts/assets.py export-hf smollm2 DIR`")
    config, trainable, _ = checkpoint.load_adapter(workdir, which)
    run = train.setup(config)
    _, frozen = partition.split(run.params, run.labels)
    params = partition.merge(trainable, frozen)
    if merge:
        return save_pretrained_merged(out_dir, params, run.model, tokenizer=getattr(run.tokenizer, "tokenizer", None))
    source = config.model.checkpoint
    base = base if base is not None else base_dir(source) if source else config.model.preset
    return export(out_dir, params, run.method, run.model.config, base_name=str(base))


def base_dir(source) -> pathlib.Path:
    """The absolute transformers directory of a checkpoint source (an asset name, an HF directory or
    a .gguf file, as in config.model.checkpoint). A GGUF's is written once beside it, `<file>.hf/`,
    by `export_base`, and reused: it is renamed into place whole, so one that is there is complete."""
    source = assets.ensure(source) if source in assets.ASSETS else source
    path = pathlib.Path(os.path.abspath(source))
    if path.suffix != ".gguf":
        return path
    out = path.with_name(path.name + ".hf")
    complete = lambda: (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    if not complete():
        try:
            export_base(path, out)
        except OSError:
            if not complete():   # else another process renamed its copy into place first
                raise
    return out


def export_base(source, out_dir) -> pathlib.Path:
    """A checkpoint ptune loads (a .gguf file, dequantized to f32, or an HF directory) as a transformers
    directory: config.json, model.safetensors and the tokenizer's files, which
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline."""
    cfg, params = checkpoints.load(source)
    tokenizer = checkpoints.load_tokenizer(source).tokenizer
    return save_pretrained_merged(out_dir, params, models.build(cfg), tokenizer=tokenizer)


AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "FEATURE_EXTRACTION": "AutoModel"}


def how_to_load(out_dir) -> str:
    """The Python lines that load an exported directory (adapter or merged) with transformers / PEFT,
    or a note saying why transformers cannot (an adapter of a random-init preset)."""
    out = str(pathlib.Path(os.path.abspath(out_dir)))
    if not os.path.exists(os.path.join(out, ADAPTER_CONFIG)):   # a merged checkpoint
        architecture = json.loads(pathlib.Path(out, "config.json").read_text())["architectures"][0]
        auto = AUTO_CLASSES["SEQ_CLS" if architecture.endswith("ForSequenceClassification") else
                            "CAUSAL_LM" if architecture.endswith(("ForCausalLM", "LMHeadModel")) else
                            "FEATURE_EXTRACTION"]
        tokenizer = os.path.exists(os.path.join(out, "tokenizer_config.json"))   # none for a preset's bytes
        return "\n".join([f"from transformers import {auto}" + (", AutoTokenizer" if tokenizer else ""),
                          *([f"tokenizer = AutoTokenizer.from_pretrained({out!r})"] if tokenizer else []),
                          f"model = {auto}.from_pretrained({out!r})"])
    config = json.loads(pathlib.Path(out, ADAPTER_CONFIG).read_text())
    base, auto = config["base_model_name_or_path"], AUTO_CLASSES[config["task_type"]]
    if not (pathlib.Path(base) / "config.json").is_file():
        return (f"note: the adapter's base {base!r} is no transformers directory (a random-init preset has none), "
                "so transformers cannot load it; ptune's hf_peft.load reads the adapter, and --base DIR names a base")
    classes = _head_rows(pathlib.Path(out, ADAPTER_WEIGHTS)) if config["task_type"] == "SEQ_CLS" else None
    return "\n".join([f"from transformers import {auto}, AutoTokenizer; from peft import PeftModel",
                      f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
                      f"model = PeftModel.from_pretrained({auto}.from_pretrained({base!r}"
                      f"{f', num_labels={classes}' if classes else ''}), {out!r})"])


def _head_rows(weights: pathlib.Path) -> int | None:
    """The class count of the task head an adapter file carries (modules_to_save), if any."""
    from safetensors import safe_open
    with safe_open(str(weights), "np") as f:
        return next((f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("weight")
                     and HEAD_KEY.fullmatch(k.removeprefix(TUNER_PREFIX).removeprefix(PROMPT_PREFIX))), None)


def _one_peft_kind(name: str, sites: Sites, family: str) -> str:
    present = [f.name for f in dataclasses.fields(sites) if getattr(sites, f.name) is not None]
    if "adapter" in present:
        raise ValueError(f"method {name!r} has bottleneck adapters, which PEFT has no format for; "
                         f"export LoRA, IA3, prompt or prefix tuning ({sorted(PEFT_TYPES)})")
    if len(present) != 1:
        found = f"sites {present}" if present else "no sites (it changes base weights or none)"
        raise ValueError(f"method {name!r} has {found}; a PEFT adapter holds exactly one of {sorted(PEFT_TYPES)}: "
                         "export each part of a hybrid from a run of that method alone, or merge LoRA/IA3 "
                         "with save_pretrained_merged")
    if present == ["prefix"] and family == "bert":
        raise ValueError(f"method {name!r}: PEFT applies prefix tuning through past_key_values, which "
                         "transformers' BERT models do not accept, so no PEFT model can load a BERT prefix; "
                         "use prompt tuning or LoRA for BERT")
    return present[0]


def _prompt_table(kind: str, flat: dict, cfg: ModelConfig) -> np.ndarray:
    """PEFT's `prompt_embeddings`: the soft prompt (L, d), or the prefix (L, layers * 2 * kv_dim)."""
    if kind == "prompt":
        return np.asarray(flat["prompt/embedding"])
    kv = np.asarray(flat["prefix/kv"])                          # (layers, 2, L, kv_dim)
    return kv.transpose(2, 0, 1, 3).reshape(kv.shape[2], -1)   # PEFT views rows as (layers*2, heads, head_dim)


def _peft_names(chosen: list[str], modules: list[str]) -> list[str]:
    """PEFT `target_modules` for `chosen` module paths: each one's shortest dotted name suffix that
    names no module outside `chosen` (c_attn; mlp.c_proj, not attn.c_proj; h.0.attn.c_attn)."""
    return [hf.hf_module(n) for n in _suffix_names(chosen, modules)]


def _suffix_names(chosen: list[str], modules: list[str]) -> list[str]:
    """For each path in `chosen`, its shortest '/'-suffix that matches no path of `modules` outside it."""
    others, names = set(modules) - set(chosen), set()
    for path in chosen:
        parts = path.split("/")
        for i in range(len(parts) - 1, -1, -1):
            suffix = "/".join(parts[i:])
            if not any(o == suffix or o.endswith("/" + suffix) for o in others):
                names.add(suffix)
                break
    return sorted(names)


# ---------------------------------------------------------------------------------------------- merge

def merge(params, model):
    """(params, sites): LoRA and IA3 folded into the kernels and biases they modify, their leaves
    removed; `sites` is the model's without them (build the merged model with it)."""
    sites, flat = model.sites, partition.flatten(params)
    out = {}
    for path, x in flat.items():
        module, _, leaf = path.rpartition("/")
        if leaf in ("lora_a", "lora_b", "ia3"):
            continue
        merged = np.asarray(x, np.float32)
        if leaf == "kernel" and f"{module}/lora_a" in flat:     # W + scale * A B, both (in, out)
            merged = merged + sites.lora.scale * (np.asarray(flat[f"{module}/lora_a"], np.float32)
                                                  @ np.asarray(flat[f"{module}/lora_b"], np.float32))
        if f"{module}/ia3" in flat:
            scale = np.asarray(flat[f"{module}/ia3"], np.float32)
            if re.search(sites.ia3.feedforward, module):          # input scaling: rows of W, bias untouched
                merged = merged * scale[:, None] if leaf == "kernel" else merged
            else:                                                  # output scaling: columns of W and the bias
                merged = merged * (scale[None, :] if leaf == "kernel" else scale)
        out[path] = merged.astype(np.asarray(x).dtype)
    return partition.unflatten(out), dataclasses.replace(sites, lora=None, ia3=None)


def save_pretrained_merged(out_dir, params, model, tokenizer=None):
    """Write `params` (LoRA/IA3 merged in) as a transformers checkpoint: config.json + model.safetensors,
    plus a transformers `tokenizer`'s files when given (its special token ids go in config.json too,
    so that transformers' `generate` stops at its end token)."""
    params, sites = merge(params, model)
    left = [f.name for f in dataclasses.fields(sites) if getattr(sites, f.name) is not None]
    if left:
        raise ValueError(f"a merged checkpoint holds base weights only, and this model also has {left} sites; "
                         "export those as a PEFT adapter (hf_peft.export) instead")
    cfg = model.config
    tensors = {k: np.ascontiguousarray(v) for k, v in hf.to_hf(cfg.family, params).items()}
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    config = {**checkpoints.config_to_hf(cfg), **{k: v for k, v in ids.items() if v is not None},
              "dtype": str(next(iter(tensors.values())).dtype)}
    return _write_dir(out_dir, {"config.json": config}, "model.safetensors", tensors, tokenizer)


def _require_new_dir(out: pathlib.Path) -> pathlib.Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; choose a new output directory "
                         "or remove it")
    return out


@contextlib.contextmanager
def new_dir(out_dir):
    """A fresh temporary directory beside `out_dir` (which must be new or empty), renamed to `out_dir`
    when the block succeeds and removed when it fails: a failure leaves nothing."""
    out = _require_new_dir(pathlib.Path(out_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_dir(out_dir, jsons: dict[str, dict], weights_name: str, tensors: dict[str, np.ndarray],
               tokenizer=None) -> pathlib.Path:
    from safetensors.numpy import save_file
    with new_dir(out_dir) as tmp:
        for name, content in jsons.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})   # transformers wants "pt"
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return pathlib.Path(out_dir)


# ---------------------------------------------------------------------------------------------- load

def load(adapter_dir, model_config: ModelConfig) -> tuple[methods.Method, dict]:
    """(method, trainable): a PEFT adapter directory as a ptune method and its trained leaves.

    `trainable` holds exactly the leaves `method` trains (sites, and the task head when the
    adapter saved one), in ptune layout. Build `models.build(model_config, method.sites)`,
    load its base weights, and `partition.merge(trainable, frozen)` where `frozen` is the
    base part of `partition.split(params, method.labels(params))`.
    """
    cfg, path = model_config, pathlib.Path(adapter_dir)
    config, tensors = _read_adapter(path)
    peft_type = config.get("peft_type")
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(peft_type)
    if kind is None:
        raise ValueError(f"{path / ADAPTER_CONFIG}: peft_type={peft_type!r}; ptune loads "
                         f"{sorted(PEFT_TYPES.values())}")
    _check_options(path / ADAPTER_CONFIG, config, cfg)
    if kind == "prefix" and cfg.family == "bert":
        raise ValueError(f"{path}: a PEFT prefix-tuning adapter for BERT cannot exist (transformers' BERT takes "
                         "no past_key_values); this adapter does not belong to a BERT model")
    head_keys = {k for k in tensors
                 if HEAD_KEY.fullmatch(k.removeprefix(TUNER_PREFIX).removeprefix(PROMPT_PREFIX))}
    if kind in ("prompt", "prefix"):
        method, origin = _load_prompt(kind, config, tensors, head_keys, cfg, path)
    else:
        method, origin = _load_tuner(kind, config, tensors, head_keys, cfg, path)
    if head_keys:
        method = methods.compose(method, methods.get("head", cfg))
        origin.update(_head_leaves(tensors, head_keys, cfg))
    template = nn.unbox(models.abstract_params(models.build(cfg, method.sites)))
    _check_fit(origin, tensors, template, method, path)
    return method, partition.unflatten({p: x for p, (_, x) in origin.items()})


def _read_adapter(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.exists() or not weights.exists():
        raise ValueError(f"{path} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                         "(ptune never reads pickled adapter_model.bin files)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e}); re-export the adapter") from None
    try:
        tensors = load_file(str(weights))
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights}: not a readable safetensors file ({e}); re-export or re-download it") from None
    return config, tensors


def _check_options(where, config: dict, cfg: ModelConfig):
    understood = UNDERSTOOD | UNDERSTOOD_BY_TYPE[config["peft_type"]]
    unsupported = {k: v for k, v in config.items() if k not in understood and v not in (None, False, {}, [])}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if config.get("init_lora_weights", True) not in PLAIN_LORA_INITS:   # PEFT converts such adapters on request
        unsupported["init_lora_weights"] = config["init_lora_weights"]
    if unsupported:
        hint = (" (for init_lora_weights, save with path_initial_model_for_weight_conversion, which turns it "
                "into a plain LoRA)" if "init_lora_weights" in unsupported else "")
        raise ValueError(f"{where}: PEFT option(s) ptune does not support: "
                         + ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
                         + f"; save the adapter without them{hint}")
    if config.get("task_type") not in TASK_TYPES:
        raise ValueError(f"{where}: task_type={config['task_type']!r}; ptune models are {TASK_TYPES[1:]}")
    extra = set(config.get("modules_to_save") or ()) - {"classifier", "score"}
    if extra:
        raise ValueError(f"{where}: modules_to_save {sorted(extra)}: ptune trains whole modules only for the "
                         f"task head ({cfg.head_name!r}); save the adapter without them")


def _load_prompt(kind, config, tensors, head_keys, cfg: ModelConfig, path):
    unknown = sorted(set(tensors) - head_keys - {"prompt_embeddings"})
    if unknown or "prompt_embeddings" not in tensors:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: a {config['peft_type']} adapter holds prompt_embeddings "
                         f"(and a task head); found {hf.short_list(tensors)}")
    table, length = tensors["prompt_embeddings"], config.get("num_virtual_tokens")
    if kind == "prompt":
        method = methods.get("prompt", cfg, length=length, init="uniform")
        expected = (length, cfg.hidden_size)
    else:   # PEFT saves the prefix MLP's output, so prefix_projection=True loads as the direct form too
        method = methods.get("ptuning_v2", cfg, length=length)
        expected = (length, cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim)
    if table.shape != expected:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: 'prompt_embeddings' has shape {table.shape} but this "
                         f"{cfg.family} model expects {expected} (num_virtual_tokens={length}); the adapter was "
                         "made for another model")
    if kind == "prompt":
        return method, {"prompt/embedding": ("prompt_embeddings", table)}
    kv = table.reshape(length, cfg.num_layers, 2, -1).transpose(1, 2, 0, 3)   # (layers, 2, L, kv_dim)
    return method, {"prefix/kv": ("prompt_embeddings", kv)}


def _load_tuner(kind, config, tensors, head_keys, cfg: ModelConfig, path):
    """LoRA or IA3: which layers the file holds decides the targets; IA3's (1, n) scales are on inputs."""
    layers = models.linear_layers(nn.unbox(models.abstract_params(models.build(cfg))))
    by_module = {hf.canonical(cfg.family, hf.hf_module(m)): m for m in layers}
    suffixes = (".lora_A.weight", ".lora_B.weight") if kind == "lora" else (".ia3_l",)
    origin, on_input = {}, []   # ptune path -> (file key, value in ptune layout)
    for key, x in tensors.items():
        if key in head_keys:
            continue
        name = key.removeprefix(TUNER_PREFIX)
        module, leaf = next(((name[: -len(s)], s) for s in suffixes if name.endswith(s)), (None, None))
        module = by_module.get(hf.canonical(cfg.family, module)) if module else None
        if module is None:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: key {key!r} names no {kind} layer of this {cfg.family} "
                             f"model (its linear layers are e.g. {hf.short_list(by_module)}); the adapter was made "
                             "for another architecture")
        if kind == "ia3":
            if x.ndim != 2 or 1 not in x.shape:
                raise ValueError(f"{path / ADAPTER_WEIGHTS}: {key!r} has shape {x.shape}; PEFT IA3 scales are "
                                 "(n, 1) or (1, n)")
            on_input += [module] if x.shape[0] == 1 else []
            origin[f"{module}/ia3"] = key, x.reshape(-1)
        else:
            origin[f"{module}/{'lora_a' if 'lora_A' in leaf else 'lora_b'}"] = key, x.T
    targeted = sorted({p.rpartition("/")[0] for p in origin})
    if kind == "lora":
        # r and lora_alpha default to PEFT's own defaults when a config leaves them out.
        method = methods.get("lora", cfg, rank=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                             targets=_suffix_names(targeted, layers), rslora=bool(config.get("use_rslora")),
                             dropout=config.get("lora_dropout") or 0.0)
    else:
        method = methods.get("ia3", cfg, targets=_suffix_names(targeted, layers),
                             feedforward=_suffix_names(on_input, layers))
    return method, origin


def _head_leaves(tensors, head_keys, cfg: ModelConfig) -> dict:
    leaves = {}
    for key in head_keys:
        name = key.removeprefix(TUNER_PREFIX).removeprefix(PROMPT_PREFIX)   # classifier.weight
        module, _, leaf = name.rpartition(".")
        path = f"{module}/{'kernel' if leaf == 'weight' else leaf}"
        leaves[path] = key, tensors[key].T if hf.transposed(cfg.family, path) else tensors[key]
    return leaves


def _check_fit(origin: dict, tensors: dict, template, method, path):
    """Every leaf `method` trains comes from the file with its shape, and the file holds nothing else."""
    shapes = {p: tuple(x.shape) for p, x in partition.flatten(template).items()}
    trained = {p for p, g in partition.flatten(method.labels(template)).items() if g != partition.FROZEN}
    errors = [f"{key!r} has shape {tensors[key].shape}, which does not fit ptune's {p} of shape {shapes[p]}"
              for p, (key, x) in origin.items() if p in shapes and tuple(x.shape) != shapes[p]]
    errors += [f"ptune has no parameter {p} for {key!r}" for p, (key, _) in origin.items() if p not in shapes]
    missing = sorted(trained - set(origin))
    errors += [f"it lacks {hf.short_list(hf.hf_key(p) for p in missing)}"] if missing else []
    if errors:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} does not fit this model: " + "; ".join(errors)
                         + "; load it with the model config it was made for")
