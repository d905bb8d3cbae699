"""Export a trained run as an HF PEFT adapter (adapter_config.json + adapter_model.safetensors):

    python scripts/export.py --workdir /tmp/run --out /tmp/run/peft [--which best]

or, with LoRA/IA3 merged into the base, as a transformers checkpoint (config.json + model.safetensors):

    python scripts/export.py --workdir /tmp/run --out /tmp/run/merged --merge

Load the adapter with `peft.PeftModel.from_pretrained(<base transformers model>, "/tmp/run/peft")`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

from ptune import cli, hf_peft

flags.DEFINE_string("workdir", None, "A trained run's workdir (with checkpoints/).")
flags.DEFINE_string("out", None, "New directory to write; it must not exist or be empty.")
flags.DEFINE_string("which", "latest", "Checkpoint: 'latest', 'best' or a step number.")
flags.DEFINE_bool("merge", False, "Write a merged transformers checkpoint instead of a PEFT adapter.")
flags.mark_flags_as_required(["workdir", "out"])


def main():
    which = flags.FLAGS.which
    print(hf_peft.export_workdir(flags.FLAGS.workdir, flags.FLAGS.out, int(which) if which.isdigit() else which,
                                 merge=flags.FLAGS.merge))


if __name__ == "__main__":
    cli.run(main)
