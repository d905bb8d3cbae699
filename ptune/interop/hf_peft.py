"""HF PEFT adapters out and in, and LoRA/IA3 merged into a plain HF checkpoint.

    export("out/adapter", params, method, model_config)     # adapter_config.json + adapter_model.safetensors
    method, trainable = load("out/adapter", model_config)   # then partition.merge(trainable, frozen base)
    save_pretrained_merged("out/merged", params, model)     # config.json + model.safetensors, LoRA/IA3 folded in
    export_workdir("/tmp/run", "/tmp/run/peft")             # a trained run's checkpoint (scripts/export.py)
    export_base("model.gguf", "out/base")                   # a GGUF as a transformers directory

An adapter directory is what `peft.PeftModel.from_pretrained(hf_model, dir)` reads, for the
`*ForCausalLM` / `*ForSequenceClassification` model of the same base. Each site kind owns its
PEFT format (`SiteKind.peft_type`, `peft_export`, `peft_load`, given a `Peft` context with the
shared conventions); this module owns the directory, the config checks and the task head.
Built in: LoRA (`r`, `lora_alpha`, `use_rslora`), IA3, prompt tuning, P-tuning (its encoder
folded, as PEFT saves it) and prefix tuning (saved, as PEFT does, in the direct form: one
(num_virtual_tokens, num_layers * 2 * kv_dim) table), plus a trained task head as `modules_to_save`.
A method without sites that trains norm layers in place exports as LN tuning (PEFT's trained
copies of them; the format is `methods.ln_tuning.PEFT`'s). PEFT applies prefixes through
`past_key_values`, which transformers' BERT does not take, so BERT prefix adapters are refused both ways.
Merging folds in every kind that implements `SiteKind.merge` (LoRA, IA3).
Every write goes to a temporary directory renamed into place: a failure leaves nothing.

`base_model_name_or_path` names a directory `AutoModelForCausalLM.from_pretrained` loads: the
run's HF checkpoint directory, or for a GGUF checkpoint its dequantized transformers form,
written once beside the file (`<file>.hf/`, like the tokenizer's `<file>.tokenizer/`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import shutil
import tempfile

import flax.linen as nn
import numpy as np

from ptune import assets, methods, models, partition
from ptune.errors import UserError
from ptune.methods import head, ln_tuning
from ptune.models import hf, pretrained
from ptune.models.model_config import HEAD_NAMES, ModelConfig
from ptune.models.sites import KINDS, LINEAR_STAGES, SiteKind, Sites

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# PEFT's prompt-learning types keep one `prompt_embeddings` table; its tuners keep per-module keys.
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
HEAD = re.compile(head.HEAD)
HEAD_KEY = re.compile(rf"({'|'.join(HEAD_NAMES)})\.(weight|bias)")   # a head in modules_to_save, not a LoRA on it
# PEFT prefixes every key with the path of the transformers model inside its PeftModel.
TUNER_PREFIX, PROMPT_PREFIX = "base_model.model.", "base_model."
# adapter_config.json keys ptune reads or that do not change the loaded model (bookkeeping, init
# schemes), besides each kind's `peft_options`. Any other key must be off (None, False, {}, []):
# ptune cannot honour it. Which layers carry a tuner (LoRA, IA3) is read from the weight file's
# keys, so the options that select layers (target_modules, layers_to_transform, exclude_modules...)
# are honoured whatever they say.
UNDERSTOOD = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
              "auto_mapping", "modules_to_save", "target_modules", "exclude_modules", "fan_in_fan_out",
              "layers_to_transform", "layers_pattern"}
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
    params, sites = method.folded(params, models.build(cfg, method.sites))
    trained = [p for p, g in partition.flatten(method.labels(params)).items() if g != partition.FROZEN]
    base = [p for p in trained if not (hf.is_site(p) or HEAD.search(p))]
    if not sites.specs and ln_tuning.PEFT.holds(base, cfg):   # norm layers trained in place: LN tuning's copies
        kind, spec = ln_tuning.PEFT, base
    else:
        kind = _one_peft_kind(method.name, sites)
        if base:
            raise UserError(f"method {method.name!r} trains base weights (e.g. {base[0]}), which a PEFT adapter "
                            "cannot hold; write the whole model with save_pretrained_merged instead")
        spec = getattr(sites, kind.name)
    flat = partition.flatten(params)
    task_type = "SEQ_CLS" if cfg.num_labels else "CAUSAL_LM" if cfg.causal else "FEATURE_EXTRACTION"
    options, tensors = kind.peft_export(spec, flat, Peft(cfg))
    config = {"peft_type": kind.peft_type, "task_type": task_type, "base_model_name_or_path": base_name,
              "inference_mode": True, **options}
    task_head = {p: flat[p] for p in trained if HEAD.search(p)}
    if task_head:
        tensors.update(hf.to_hf(cfg.family, partition.unflatten(task_head)))
        config["modules_to_save"] = [cfg.head_name]
    prefix = PROMPT_PREFIX if kind.peft_type in PROMPT_LEARNING else TUNER_PREFIX
    # A key a kind gives under PEFT's top prefix (VeRA's shared base_model.vera_A) is whole already.
    tensors = {(k if k == "prompt_embeddings" or k.startswith(PROMPT_PREFIX) else prefix + k):
               np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    return _write_dir(out_dir, {ADAPTER_CONFIG: config}, ADAPTER_WEIGHTS, tensors)


def export_workdir(workdir, out_dir, which: str | int = "latest", merge: bool = False, base=None):
    """A trained run's adapter checkpoint (`ptune.training.checkpoint`) as a PEFT adapter directory, or with
    `merge` as a transformers checkpoint with LoRA/IA3 merged in (plus the run's tokenizer files).
    The frozen base is rebuilt from the run's config, as training built it. The adapter's
    `base_model_name_or_path` is `base` (an HF directory, written as given), else `base_dir` of the
    run's checkpoint; a random-init preset has no loadable base, so its name is written and
    `how_to_load` says so (refusing would also refuse ptune's own `load` of the adapter).
    Returns the directory path."""
    from ptune.training import builder, checkpoint
    _require_new_dir(pathlib.Path(out_dir))   # before minutes of loading, not after
    if base is not None:
        if merge:
            raise UserError(f"base={base!r} names an adapter's base, but a merged checkpoint holds its own; "
                            "drop base or merge")
        if not (pathlib.Path(base) / "config.json").is_file():
            raise UserError(f"base {base!r} has no config.json; pass a transformers model directory, e.g. one "
                            "written by `python scripts/assets.py export-hf smollm2 DIR`")
    config, trainable, _ = checkpoint.load_adapter(workdir, which)
    run = builder.setup(config, training=False)
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
    cfg, params = pretrained.load(source)
    tokenizer = pretrained.load_tokenizer(source).tokenizer
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


def _one_peft_kind(name: str, sites: Sites) -> SiteKind:
    kinds = sites.kinds()
    if len(kinds) != 1:
        found = f"sites {sites.names()}" if kinds else "no sites (it changes base weights or none)"
        exportable = sorted(k.name for k in KINDS.values() if k.peft_type)
        raise UserError(f"method {name!r} has {found}; a PEFT adapter holds exactly one of {exportable}: "
                        "export each part of a hybrid from a run of that method alone, or merge LoRA/IA3 "
                        "with save_pretrained_merged")
    kind = kinds[0][0]
    if not kind.implements("peft_export"):
        raise kind.missing("its HF PEFT format", "peft_export (with peft_type and peft_load)")
    return kind


class Peft:
    """PEFT's conventions that site kinds share, for one model `config` (and, when loading, the adapter's
    `weights` file, named in errors)."""

    def __init__(self, config: ModelConfig, weights: pathlib.Path | None = None):
        self.config, self.weights = config, weights

    @functools.cached_property
    def layers(self) -> list[str]:
        """Module paths of the model's linear layers."""
        return models.linear_layers(nn.unbox(models.abstract_params(models.build(self.config))))

    def peft_key(self, path: str, names: dict[str, str]) -> str:
        """A tuner leaf's key without PEFT's model prefix: c_attn/lora_a -> ...c_attn.lora_A.weight, given
        `names` {PEFT name: ptune leaf name}."""
        module, _, leaf = path.rpartition("/")
        return f"{hf.hf_module(module)}.{next(n for n, ours in names.items() if ours == leaf)}"

    def target_modules(self, chosen: list[str], modules: list[str] | None = None) -> list[str]:
        """PEFT `target_modules` for `chosen` module paths among `modules` (default: the linear layers; see
        `_peft_names`)."""
        return _peft_names(chosen, self.layers if modules is None else modules)

    def names(self, chosen: list[str], modules: list[str] | None = None) -> list[str]:
        """ptune `targets` (module-name suffixes) that select exactly `chosen` among `modules` (the linear layers)."""
        return _suffix_names(chosen, self.layers if modules is None else modules)

    def tuner_config(self, targeted: list[str]) -> dict:
        return dict(target_modules=self.target_modules(targeted),
                    fan_in_fan_out=self.config.family == "gpt2")   # GPT-2's Conv1D layers store (in, out)

    def prompt_config(self, length: int) -> dict:
        return dict(num_virtual_tokens=length, num_layers=self.config.num_layers, num_transformer_submodules=1)

    def layer_leaves(self, kind: str, tensors: dict, names: dict[str, str], modules: list[str] | None = None) -> dict:
        """{ptune leaf path: (file key, array as in the file)} of a tuner's per-module `tensors`, given
        `names` {PEFT name: ptune leaf name}; a key naming none of `modules` (the linear layers) is an error."""
        family = self.config.family
        modules = self.layers if modules is None else modules
        by_module = {hf.canonical(family, hf.hf_module(m)): m for m in modules}
        origin = {}
        for key, x in tensors.items():
            name = key.removeprefix(TUNER_PREFIX)
            module, leaf = next(((name[: -len(n) - 1], ours) for n, ours in names.items()
                                 if name.endswith("." + n)), (None, None))
            module = by_module.get(hf.canonical(family, module)) if module else None
            if module is None:
                raise UserError(f"{self.weights}: key {key!r} names no {kind} layer of this {family} model (the "
                                f"candidates are e.g. {hf.short_list(by_module)}); the adapter was made for "
                                "another architecture")
            origin[f"{module}/{leaf}"] = key, x
        return origin

    def prompt_table(self, config: dict, tensors: dict, expected: tuple) -> np.ndarray:
        """A prompt-learning adapter's `prompt_embeddings`, which must have the `expected` shape."""
        if set(tensors) != {"prompt_embeddings"}:
            raise UserError(f"{self.weights}: a {config['peft_type']} adapter holds prompt_embeddings (and a "
                            f"task head); found {hf.short_list(tensors)}")
        table = tensors["prompt_embeddings"]
        if table.shape != expected:
            raise UserError(f"{self.weights}: 'prompt_embeddings' has shape {table.shape} but this "
                            f"{self.config.family} model expects {expected} (num_virtual_tokens="
                            f"{config.get('num_virtual_tokens')}); the adapter was made for another model")
        return table


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
    """(params, sites): every site kind that implements `SiteKind.merge` (LoRA, IA3) folded into the
    kernels and biases it modifies, in float32, its leaves removed; `sites` is the model's without them
    (build the merged model with it). Kinds wrapping the product merge before those wrapping the layer,
    as they compute."""
    mergeable = [(k, s) for stage in LINEAR_STAGES for k, s in model.sites.kinds()
                 if k.wraps == stage and k.implements("merge")]
    flat, layers = partition.flatten(params), {}
    for path, x in flat.items():
        module, _, leaf = path.rpartition("/")
        layers.setdefault(module, {})[leaf] = np.asarray(x, np.float32)
    merged = {}
    for module, leaves in layers.items():
        for kind, spec in mergeable:
            if any(kind.owns(f"{module}/{leaf}") for leaf in leaves):
                leaves = kind.merge(spec, leaves, module)
        merged.update({f"{module}/{leaf}": x for leaf, x in leaves.items()})
    out = {p: merged[p].astype(np.asarray(x).dtype) for p, x in flat.items() if p in merged}
    return partition.unflatten(out), model.sites.without(*(k.name for k, _ in mergeable))


def save_pretrained_merged(out_dir, params, model, tokenizer=None):
    """Write `params` (LoRA/IA3 merged in) as a transformers checkpoint: config.json + model.safetensors,
    plus a transformers `tokenizer`'s files when given (its special token ids go in config.json too,
    so that transformers' `generate` stops at its end token)."""
    params, sites = merge(params, model)
    if sites.specs:
        raise UserError(f"a merged checkpoint holds base weights only, and this model also has {sites.names()} "
                        "sites; export those as a PEFT adapter (hf_peft.export) instead (a site kind that changes "
                        "linear layers merges if it defines SiteKind.merge)")
    cfg = model.config
    tensors = {k: np.ascontiguousarray(v) for k, v in hf.to_hf(cfg.family, params).items()}
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    config = {**pretrained.config_to_hf(cfg), **{k: v for k, v in ids.items() if v is not None},
              "dtype": str(next(iter(tensors.values())).dtype)}
    return _write_dir(out_dir, {"config.json": config}, "model.safetensors", tensors, tokenizer)


def _require_new_dir(out: pathlib.Path) -> pathlib.Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; choose a new output directory "
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
    loaders = {k.peft_type: k for k in (*KINDS.values(), ln_tuning.PEFT) if k.peft_type}
    kind = loaders.get(peft_type)
    if kind is None:
        raise UserError(f"{path / ADAPTER_CONFIG}: peft_type={peft_type!r}; ptune loads {sorted(loaders)}")
    _check_options(path / ADAPTER_CONFIG, config, cfg, kind)
    head_keys = {k for k in tensors
                 if HEAD_KEY.fullmatch(k.removeprefix(TUNER_PREFIX).removeprefix(PROMPT_PREFIX))}
    sites = {k: x for k, x in tensors.items() if k not in head_keys}
    name, options, origin = kind.peft_load(config, sites, Peft(cfg, path / ADAPTER_WEIGHTS))
    method = methods.get(name, cfg, **options)
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
        raise UserError(f"{path} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                        "(ptune never reads pickled adapter_model.bin files)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: not valid JSON ({e}); re-export the adapter") from None
    try:
        tensors = load_file(str(weights))
    except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"{weights}: not a readable safetensors file ({e}); re-export or re-download it") from None
    return config, tensors


def _check_options(where, config: dict, cfg: ModelConfig, kind: SiteKind):
    understood = UNDERSTOOD | kind.peft_options
    unsupported = {k: v for k, v in config.items() if k not in understood and v not in (None, False, {}, [])}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if config.get("init_lora_weights", True) not in PLAIN_LORA_INITS:   # PEFT converts such adapters on request
        unsupported["init_lora_weights"] = config["init_lora_weights"]
    if unsupported:
        hint = (" (for init_lora_weights, save with path_initial_model_for_weight_conversion, which turns it "
                "into a plain LoRA)" if "init_lora_weights" in unsupported else "")
        raise UserError(f"{where}: PEFT option(s) ptune does not support: "
                        + ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
                        + f"; save the adapter without them{hint}")
    if config.get("task_type") not in TASK_TYPES:
        raise UserError(f"{where}: task_type={config['task_type']!r}; ptune models are {TASK_TYPES[1:]}")
    extra = set(config.get("modules_to_save") or ()) - {"classifier", "score"}
    if extra:
        raise UserError(f"{where}: modules_to_save {sorted(extra)}: ptune trains whole modules only for the "
                        f"task head ({cfg.head_name!r}); save the adapter without them")


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
    errors += [f"it lacks weights for ptune's {hf.short_list(missing)}"] if missing else []
    if errors:
        raise UserError(f"{path / ADAPTER_WEIGHTS} does not fit this model: " + "; ".join(errors)
                        + "; load it with the model config it was made for")
