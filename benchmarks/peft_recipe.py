"""The converged study's recipe run with HF PEFT + transformers on PyTorch (issue 21's cross-check).

    pip install -e '.[bench]'
    python benchmarks/peft_recipe.py --task sentiment --select workdirs/converged/select-sentiment \
        --out workdirs/converged/peft-sentiment.jsonl [--methods full,lora,prompt,ia3 --seeds 0,1,2]

Like for like with experiments/study_converged.py: the same examples, encoded by ptune (same
tokens, template and truncation) and drawn in ptune's batch order for each seed
(`batching.batch_at`), batch 16, AdamW (weight decay 0) with 50 warmup steps then constant, one
learning rate for every trainable tensor — the one ptune's selection chose for the method
(`--select`) — gradient clipping at 1, validation accuracy every epoch, early stopping with the
same patience, at most the same epochs, test accuracy of the best epoch's weights. The model is
`BertForSequenceClassification` from the MiniLM files (pooler + fresh classifier, as ptune's
head objective); PEFT trains the classifier through modules_to_save (task type SEQ_CLS).

Which ptune method each PEFT config matches (the defaults of both):
  full        no PEFT: every parameter trains            ptune full
  lora        LoraConfig(r=8, lora_alpha=16, dropout 0, query/value)     ptune lora (its defaults)
  prompt      PromptTuningConfig(20 virtual tokens, SAMPLE_VOCAB)   ptune prompt, init='vocab'
              (PEFT samples the whole vocabulary, ptune the first 5,000 ids; PEFT's RANDOM is an
              nn.Embedding N(0, 1) draw, which no ptune init matches: its 'uniform' is U(-0.5, 0.5))
  prefix      PrefixTuningConfig(20, prefix_projection=True, encoder_hidden_size=512)  ptune prefix
              (prefix_projection=False trains the key/value prefixes directly: ptune ptuning_v2);
              PEFT refuses it on BERT under transformers 5 (see METHODS), kept for decoders
  ia3         IA3Config (key, value, output.dense; output.dense's input scaled)   ptune ia3
Each (method, seed) appends one JSON line to --out; lines already there are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ptune import cli  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Not prefix: PEFT 0.21's prefix tuning refuses BERT under transformers 5 ("Model does not support past
# key values which are required for prefix tuning."): PEFT injects prefixes through the KV cache, which
# transformers' encoders no longer take (huggingface/peft PR 2989), so MiniLM has no PEFT prefix reference.
METHODS = ["full", "lora", "prompt", "ia3"]


def peft_config(method: str, num_virtual: int = 20):
    import peft
    task = peft.TaskType.SEQ_CLS
    if method == "lora":
        return peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual,
                                       prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual, prefix_projection=True,
                                       encoder_hidden_size=512)
    if method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=["key", "value", "output.dense"],
                              feedforward_modules=["output.dense"])
    raise ValueError(f"--methods: {method!r} has no PEFT config here; choose from {METHODS}")


def ptune_data(study, task: str, method: str, lr: float, seed: int):
    """The study's config for this point and ptune's encoded train/validation/test arrays."""
    from ptune import config as config_lib
    from ptune.training import builder
    config = config_lib.override(study.get_config(f"select:{task}"),
                                 {"method": method, "optim.learning_rate": lr, "seed": seed}, "peft_recipe")
    run = builder.setup(config)
    encode = builder.encoder(config, run.task, run.template, run.tokenizer, run.model.config.family)
    return config, {**run.data, "test": encode(run.task.split("test"))}


def model_for(method: str, seed: int, num_labels: int):
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    from ptune import assets
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(assets.ensure("minilm"), num_labels=num_labels)
    return model if method == "full" else peft.get_peft_model(model, peft_config(method))


def accuracy(model, arrays, batch_size: int = 50) -> float:
    import torch
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(arrays["labels"]), batch_size):
            ids = torch.as_tensor(arrays["input_ids"][start:start + batch_size], dtype=torch.long)
            mask = torch.as_tensor(arrays["attention_mask"][start:start + batch_size], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask).logits
            right += int((logits.argmax(-1).numpy() == arrays["labels"][start:start + batch_size]).sum())
    return right / len(arrays["labels"])


def train_one(method: str, seed: int, lr: float, config, data) -> dict:
    import torch

    from ptune.data import batching
    tc = config.train
    model = model_for(method, seed, int(data["train"]["labels"].max()) + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = config.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    best, best_step, waited, best_state, stopped = -1.0, 0, 0, None, tc.steps
    t0 = time.perf_counter()
    for step in range(tc.steps):
        batch = batching.batch_at(data["train"], step, tc.batch_size, seed)
        model.train()
        out = model(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                    attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
                    labels=torch.as_tensor(batch["labels"], dtype=torch.long))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.clip_norm)
        opt.step()
        sched.step()
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            acc = accuracy(model, data["validation"])
            if acc > best:
                best, best_step, waited = acc, done, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= tc.patience:
                    stopped = done
                    break
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    return {"method": method, "seed": seed, "learning_rate": lr, "validation_accuracy": best,
            "test_accuracy": accuracy(model, data["test"]), "best_step": best_step, "stopped_step": stopped,
            "train_seconds": seconds, "trainable_params": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--select", required=True, help="the study's select workdir (its chosen learning rates)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    from ptune import config as config_lib
    study = config_lib.load_module(os.path.join(ROOT, "experiments", "study_converged.py"))
    rates = study.chosen_rates(args.select)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["method"], r["seed"]) for r in map(json.loads, f)}
    for method in args.methods.split(","):
        if method not in rates:
            raise SystemExit(f"error: {args.select} has no finished selection for {method!r}; run it first")
        for seed in map(int, args.seeds.split(",")):
            if (method, seed) in done:
                continue
            config, data = ptune_data(study, args.task, method, rates[method], seed)
            row = {"task": args.task, **train_one(method, seed, rates[method], config, data)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
