"""Nothing in ptune runs code that came with a checkpoint: weights are read only from safetensors
or GGUF (no pickle, no torch.load), transformers never gets trust_remote_code, and numpy never
unpickles. The scan covers the package and the launchers; the checks of a checkpoint's record
before any of its arrays is read are in tests/test_catalogue.py."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (what, pattern): each would let a file run code when it is loaded.
UNTRUSTED = [
    ("pickle", re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|\bpickle\.", re.M)),
    ("torch.load", re.compile(r"\btorch\.load\s*\(")),
    ("trust_remote_code", re.compile(r"trust_remote_code\s*=\s*(True|[^F\s])")),
    ("allow_pickle", re.compile(r"allow_pickle\s*=\s*True")),
]
FROM_PRETRAINED = re.compile(r"\.from_pretrained\((?P<args>[^()]*(\([^()]*\)[^()]*)*)\)")


def findings(source: str) -> list[str]:
    found = [what for what, pattern in UNTRUSTED if pattern.search(source)]
    found += ["from_pretrained with trust_remote_code" for call in FROM_PRETRAINED.finditer(source)
              if "trust_remote_code" in call["args"]]
    return found


def sources():
    return sorted(p for d in ("ptune", "scripts") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("snippet,what", [
    ("import pickle\n", "pickle"), ("x = pickle.loads(b)\n", "pickle"), ("import dill\n", "pickle"),
    ("state = torch.load(path)\n", "torch.load"), ("np.load(f, allow_pickle=True)\n", "allow_pickle"),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)\n", "trust_remote_code"),
    ("AutoTokenizer.from_pretrained(str(p), trust_remote_code=flag)\n", "from_pretrained with trust_remote_code"),
])
def test_the_scan_finds_untrusted_loading(snippet, what):
    assert what in findings(snippet)


def test_ptune_and_scripts_load_nothing_untrusted():
    assert len(sources()) > 30
    assert {str(p.relative_to(ROOT)): f for p in sources() if (f := findings(p.read_text()))} == {}


def test_weights_are_read_only_from_safetensors_or_gguf():
    readers = ROOT / "ptune" / "models" / "pretrained.py"
    text = readers.read_text()
    assert "safetensors.numpy import load_file" in text and "gguf.GGUFReader" in text
    assert not re.search(r"\.bin\b.*open|open\(.*\.bin", text)
