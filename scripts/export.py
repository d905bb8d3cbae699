"""Export a trained run as an HF PEFT adapter (adapter_config.json + adapter_model.safetensors):

    python scripts/export.py --workdir /tmp/run --out /tmp/run/peft [--which best] [--base DIR]

or, with LoRA/IA3 merged into the base, as a transformers checkpoint (config.json + model.safetensors
+ the tokenizer's files):

    python scripts/export.py --workdir /tmp/run --out /tmp/run/merged --merge

Then it prints the Python lines that load the result. The adapter's base_model_name_or_path is
--base, else the run's HF checkpoint directory, else (a GGUF checkpoint such as smollm2) its
dequantized transformers copy, written once beside the .gguf file."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

from ptune import cli
from ptune.interop import hf_peft

flags.DEFINE_string("workdir", None, "A trained run's workdir (with checkpoints/).")
flags.DEFINE_string("out", None, "New directory to write; it must not exist or be empty.")
flags.DEFINE_string("which", "latest", "Checkpoint: 'latest', 'best' or a step number.")
flags.DEFINE_bool("merge", False, "Write a merged transformers checkpoint instead of a PEFT adapter.")
flags.DEFINE_string("base", None, "The transformers directory (with config.json) to name as the adapter's "
                    "base_model_name_or_path, written as given; default: the run's own base.")
flags.mark_flags_as_required(["workdir", "out"])


def main():
    which = flags.FLAGS.which
    out = hf_peft.export_workdir(flags.FLAGS.workdir, flags.FLAGS.out, int(which) if which.isdigit() else which,
                                 merge=flags.FLAGS.merge, base=flags.FLAGS.base)
    print(f"wrote {out}\n{hf_peft.how_to_load(out)}")


if __name__ == "__main__":
    cli.run(main)
