"""Two local processes (2 CPU devices each, gloo collectives) train as one 4-device job and
match a single process with 4 devices: same per-step losses and final metrics."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.train.steps=4", "--config.train.batch_size=8", "--config.train.eval_batch_size=40",
             "--config.train.log_every=1", "--config.train.eval_every=2", "--config.train.progress=False",
             "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _command(workdir, *flags):
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
            os.path.join(ROOT, "experiments", "default.py"), f"--workdir={workdir}", *OVERRIDES, *flags]


def _env(devices):
    return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow   # two JAX processes, ~25 s
def test_two_processes_train_like_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_command(single), env=_env(4), check=True, timeout=600, capture_output=True)
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_command(multi, f"--coordinator_address={address}", "--num_processes=2",
                                       f"--process_id={i}"), env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    a, b = _records(single), _records(multi)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert sum(r["split"] == "train" for r in a) == 4
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), (ra, rb)
        if "accuracy" in ra:
            assert rb["accuracy"] == ra["accuracy"]
    final = json.loads((multi / "final_metrics.json").read_text())
    assert final["validation_loss"] == pytest.approx(json.loads((single / "final_metrics.json").read_text())
                                                     ["validation_loss"], abs=1e-5)
    assert "(mesh {'data': 2, 'fsdp': 2, 'tensor': 1})" in outputs[0]   # process 0 reports ...
    assert "trainable params" not in outputs[1]                        # ... and process 1 does not
