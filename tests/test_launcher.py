"""A custom method in a module beside its config file, as a user outside the package writes it:
the config imports it (its folder is importable), an optimizer group of the method's own label
is set from the command line, and export, serve and the Python API rebuild the run in fresh
processes without being told about the module (the workdir's config records it)."""

import json
import os
import subprocess
import sys

from test_checkpoint import ROOT

MY_METHODS = '''
from ptune import methods
from ptune.models.sites import LoRA, Sites


def mlp_lora(model_config, rank: int = 4):
    def label(path, leaf):
        if "/lora_" in path:
            return "mlp_lora"
    return methods.Method("mlp_lora", Sites(lora=LoRA(rank, 2.0 * rank, r"mlp/c_fc$")), rules=label)


methods.register("mlp_lora", mlp_lora)
'''

CONFIG = '''
import my_methods  # noqa: F401  (beside this file: registers mlp_lora)
from ptune.config import base_config, with_method


def get_config():
    config = with_method(base_config(), "mlp_lora")
    config.task.options = {"n_train": 64, "n_eval": 32}
    config.task.max_length = 32
    config.train.update(steps=3, batch_size=4, eval_batch_size=16, eval_every=3, progress=False)
    config.checkpoint.every_steps = 3
    return config
'''


def run(*args, cwd, stdin=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_custom_method_beside_its_config_trains_exports_serves_and_loads(tmp_path):
    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "my_methods.py").write_text(MY_METHODS)
    (tmp_path / "research" / "mine.py").write_text(CONFIG)
    elsewhere = tmp_path / "elsewhere"   # the working directory is not the config's folder
    elsewhere.mkdir()
    workdir = tmp_path / "run"
    run(os.path.join(ROOT, "scripts/train.py"), f"--config={tmp_path / 'research' / 'mine.py'}", f"--workdir={workdir}",
        "--config.optim.groups.mlp_lora.learning_rate=0.05", cwd=elsewhere)
    config = json.load(open(workdir / "config.json"))
    assert config["imports"] == [f"my_methods={tmp_path / 'research' / 'my_methods.py'}",
                                 f"ptune_config_mine={tmp_path / 'research' / 'mine.py'}"]
    assert config["optim"]["groups"]["mlp_lora"]["learning_rate"] == 0.05   # every field filled in
    assert config["optim"]["groups"]["mlp_lora"]["schedule"] == "constant"

    run(os.path.join(ROOT, "scripts/export.py"), f"--workdir={workdir}", f"--out={tmp_path / 'peft'}", cwd=elsewhere)
    adapter = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert adapter["peft_type"] == "LORA" and adapter["target_modules"] == ["c_fc"]

    served = run(os.path.join(ROOT, "scripts/serve.py"), f"--task=mine={workdir}", cwd=elsewhere,
                 stdin=json.dumps({"task": "mine", "text": "a fine day"}) + "\n")
    [prediction] = [json.loads(line) for line in served.stdout.splitlines()]
    names = json.load(open(workdir / "task.json"))["label_names"]
    assert prediction["task"] == "mine" and prediction["prediction"] in names

    api = f"import ptune; print(ptune.load_adapter({str(workdir)!r}).predict(['a fine day']))"
    assert run("-c", api, cwd=elsewhere).stdout.strip() == f"[{prediction['prediction']!r}]"
