"""README.md's every code block runs as written (issue 20): the test reads README.md, and each fenced
```bash and ```python block is one test that runs it, in README order. ```json blocks are the data files
the text around them names (`data/reviews/train.jsonl`, ...): every block's directory holds them, exactly
as shown. A block without a language is a display (the diagram, the layout) and must hold no command.

The only changes to what a block does are mechanical ones, made by programs standing in for the
interpreter and pip (not by copies of the commands):

- `python`, `python3` and `.venv/bin/python` run as this test's interpreter (sys.executable):
  `python3 -m venv .venv` is a no-op (the test's environment is the venv), `pip install -e <spec>`
  checks that pyproject.toml's requirements of <spec> (and its extras) are installed and does nothing
  else; when one is not, the block is skipped with a message naming the extra and the missing package.
- short runs: `scripts/train.py` and `scripts/sweep.py` get QUICK's overrides appended (2 steps, one
  evaluation, one checkpoint), `benchmarks/vs_peft.py` measures LoRA's step only, with one warm-up step
  (QUICK; the README's `--generate lora` stays).
- each block runs in a fresh temporary directory laid out like the repository (symlinks to its files
  and folders, a copy of docs/ so that the study's report writes there, the JSON examples as files), so
  relative paths work and nothing is written into the repository. Blocks naming the same
  `workdirs/<name>` form a chain and run in one directory, in README order: a block runs the earlier
  blocks of its chain first (once per session), so export runs after its training, serve after its
  runs, whichever of them pytest selected.
- SUBSTITUTIONS lists each block that cannot run literally, with what the test does instead and why;
  test_every_block_runs_or_is_substituted fails on a block that is neither runnable nor listed.

Python blocks run in a subprocess with the repository on PYTHONPATH. A line calling print() with a
comment, or followed by whole-line comments, shows its output: those comments must match the printed
lines, in order (whitespace runs count as one space; `...` stands for any text).
"""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Appended to a script's command line (the last occurrence of a flag wins, so these override the README's).
QUICK = {
    "scripts/train.py": ["--config.train.steps=2", "--config.train.eval_every=2", "--config.checkpoint.every_steps=2",
                         "--config.train.progress=False"],
    "scripts/sweep.py": ["--config.train.steps=2", "--config.train.eval_every=2", "--config.checkpoint.every_steps=2",
                         "--config.train.progress=False"],
    # the step of LoRA only (of its 5 methods) after 1 warm-up step; the README's --generate lora as given
    "benchmarks/vs_peft.py": ["--methods=lora", "--warmup=1"],
}


@dataclasses.dataclass(frozen=True)
class Substitution:
    """What the test runs instead of a block as written, and why. `match` picks the block (a substring
    of exactly one block); `replace` = (old, new) in its text; `before` = a regex finding, in README's
    prose, an inline command the block's directory runs first."""
    match: str
    reason: str
    replace: tuple[str, str] | None = None
    before: str | None = None


SUBSTITUTIONS = [
    Substitution("-m pytest -q", replace=("-m pytest -q", "-m pytest -q --collect-only -p no:cacheprovider"),
                 reason="the whole suite, this test included (recursion, ~15 min): here it only collects; "
                        ".ci/run runs the command as written (tests/test_readme.py checks that)"),
    Substitution("scripts/study.py --workdir workdirs/study",
                 before=r"mkdir -p workdirs && cp -r docs/study-runs [^\s`]+",
                 reason="the study takes ~4 hours: first the README's own resume step (the inline command after "
                        "the block: the committed records), so every stage finds its results and only the report "
                        "is rebuilt"),
]

# Blocks taking more than ~30 s on the 2-core CPU (a regex over the block's text -> why); a block whose
# chain holds a slow block is slow too (it runs that block first).
SLOW = {
    r"(?i)smollm2|minilm|your_data\.py": "a 2-step run of SmolLM2-135M: loading, compiling, a full evaluation (~1 min)",
    r"scripts/sweep\.py": "6 points one by one, then 6 vmapped in 2 jobs (~1 min)",
    r"scripts/export\.py": "a training run, then exports that each rebuild it (~20 s)",
    r"XLA_FLAGS": "8 fake devices: the sharded step compiled for the whole mesh (~10 s)",
    r"-m pytest": "collects the whole suite (~12 s)",
    r"scripts/study\.py": "4 sweep launches that skip every point, then the report and its plots",
    r"benchmarks/vs_peft\.py": "GPT-2 small: the matmul peak, LoRA's step and generation at batch 1 and 8, ptune and "
                               "PyTorch in 7 processes (~1.7 min without generation, ~9 min with it on a shared CPU)",
}

# README claims checked after a block ran (a regex over the block's text -> check(directory)).
def _check_reviews(d):
    task = json.load(open(os.path.join(d, "workdirs/reviews/task.json")))
    assert task["label_names"] == ["negative", "positive"] and task["verbalizer"] == [" negative", " positive"], task


def _check_support(d):
    assert json.load(open(os.path.join(d, "workdirs/support/task.json")))["kind"] == "chat"


def _check_predictions(d):
    requests = [json.loads(line) for line in open(os.path.join(d, "requests.jsonl")) if line.strip()]
    predictions = [json.loads(line) for line in open(os.path.join(d, "predictions.jsonl")) if line.strip()]
    assert [p["task"] for p in predictions] == [r["task"] for r in requests], predictions
    assert all(isinstance(p["prediction"], str) for p in predictions), predictions


CLAIMS = {
    r"your_data\.py:classify": _check_reviews,     # "The classes are the sorted distinct labels ..."
    r"your_data\.py:chat": _check_support,
    r"(?s)scripts/serve\.py .*> predictions\.jsonl": _check_predictions,   # predictions in the requests' order
}

MISSING_EXTRA = 97   # the pip stand-in's exit status when a requirement is not installed


# ---- README.md as blocks ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    lang: str
    text: str
    line: int        # the opening fence's line (1-based)
    section: str     # the nearest heading above
    lead: str        # the paragraph right above the block

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{self.index:02d}-{slug}-{self.lang or 'text'}"

    def workdirs(self) -> set[str]:
        return set(re.findall(r"workdirs/([\w.-]+)", self.text))

    def files(self) -> list[str]:
        """For a JSON block: the files (backticked .json/.jsonl paths) its lead paragraph names."""
        return re.findall(r"`([\w./-]+\.jsonl?)`", self.lead)


def parse(text: str) -> list[Block]:
    blocks, lines, i, section, paragraph, lead = [], text.splitlines(), 0, "", [], ""
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```\s*([\w+-]*)\s*$", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(len(blocks), fence.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1, section,
                                " ".join(paragraph) or lead))
            i, paragraph, lead = end + 1, [], ""
            continue
        if line.startswith("#"):
            section, paragraph, lead = line.lstrip("#").strip(), [], ""
        elif not line.strip():
            lead, paragraph = " ".join(paragraph) or lead, []
        else:
            paragraph.append(line)
        i += 1
    return blocks


def readme_blocks() -> list[Block]:
    return parse(open(README).read())


def substitution(block: Block) -> Substitution | None:
    found = [s for s in SUBSTITUTIONS if s.match in block.text]
    assert len(found) <= 1, f"{block.id}: several substitutions match"
    return found[0] if found else None


def chain(block: Block, blocks: list[Block]) -> list[Block]:
    """The runnable blocks sharing a workdir with `block`, directly or through others, in README order."""
    runnable = [b for b in blocks if b.lang in ("bash", "python")]
    group, names = {block.index}, set(block.workdirs())
    grown = True
    while grown:
        grown = False
        for b in runnable:
            if b.index not in group and b.workdirs() & names:
                group.add(b.index)
                names |= b.workdirs()
                grown = True
    return [b for b in runnable if b.index in group]


def slow_reason(block: Block, blocks: list[Block]) -> str | None:
    for b in chain(block, blocks):
        if b.index > block.index:
            break
        for pattern, reason in SLOW.items():
            if re.search(pattern, b.text):
                return reason if b is block else f"runs {b.id} first: {reason}"
    return None


def shown_output(source: str) -> list[list[str]]:
    """The output a Python block shows for a line calling print(): its own comment, or else the run of
    whole-line comments right below it."""
    comments = {t.start[0]: (t.start[1], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    text = lambda comment: comment[2:] if comment.startswith("# ") else comment[1:]
    runs, lines = [], source.splitlines()
    for n, line in enumerate(lines, 1):
        column, comment = comments.get(n, (len(line), ""))
        if "print(" not in line[:column]:
            continue
        run = [text(comment)] if comment else []
        for following in lines[n:] if not comment else []:
            if not following.startswith("#"):
                break
            run.append(text(following))
        if run:
            runs.append(run)
    return runs


def check_output(shown: list[list[str]], printed: str, where: str):
    squash = lambda s: " ".join(s.split())
    out, position = [squash(line) for line in printed.splitlines()], 0
    for run in shown:
        patterns = [re.compile(".*".join(re.escape(part) for part in squash(line).split("..."))) for line in run]
        starts = [k for k in range(position, len(out) - len(run) + 1)
                  if all(p.fullmatch(out[k + j]) for j, p in enumerate(patterns))]
        assert starts, f"{where} prints\n{printed}\nwhich does not hold the output the README shows:\n" + "\n".join(run)
        position = starts[0] + len(run)


# ---- the stand-ins for python and pip ------------------------------------------------------------------

STAND_IN = r'''
import importlib.metadata, importlib.util, json, os, re, sys, tomllib
REAL, ROOT, QUICK = {real!r}, {root!r}, {quick!r}
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]


def log(kind, argv):
    with open(os.environ["README_TEST_LOG"], "a") as f:
        f.write(json.dumps({{"kind": kind, "argv": argv}}) + "\n")


def missing(spec):
    """Requirements of `pip install -e <spec>` (pyproject.toml's, with the spec's extras) not installed."""
    from packaging.requirements import Requirement
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = re.findall(r"[\w-]+", spec.split("[", 1)[1]) if "[" in spec else []
    out = [] if importlib.util.find_spec("ptune") else [("", "ptune (the package itself)")]
    for extra in ["", *extras]:
        if extra and extra not in project["optional-dependencies"]:
            out.append((extra, "(no such extra in pyproject.toml)"))
            continue
        for text in project["optional-dependencies"][extra] if extra else project["dependencies"]:
            requirement = Requirement(text)
            try:
                have = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            if have is None or not requirement.specifier.contains(have, prereleases=True):
                out.append((extra, f"{{text}} (installed: {{have}})"))
    return out


if name.startswith("pip"):
    log("pip", args)
    specs = [a for a in args if not a.startswith("-")][1:] if args[:1] == ["install"] else None
    if not specs or any(not a.startswith(".") for a in specs):
        sys.exit(f"README test: pip stand-in only checks 'pip install [-q] -e .[extras]', got pip {{' '.join(args)}}")
    gaps = [g for spec in specs for g in missing(spec)]
    if gaps:
        print("README test: missing " + "; ".join(f"extra '{{e}}': {{m}}" if e else m for e, m in gaps),
              file=sys.stderr)
        sys.exit({missing_code})
    print(f"README test: pip install {{' '.join(args)}}: already installed")
    sys.exit(0)
if args[:2] == ["-m", "venv"]:
    log("venv", args)
    print("README test: python -m venv: the test's interpreter is the venv")
    sys.exit(0)
script = args[0] if args and not args[0].startswith("-") else ""
extra = next((v for k, v in QUICK.items() if script.endswith(k)), [])
log("python", args + extra)
os.execv(REAL, [REAL, *args, *extra])
'''


def layout(directory: str, blocks: list[Block]):
    """`directory` as the repository the README assumes: its entries linked, docs/ copied (the study's
    report writes there), stand-ins for .venv/bin/{python,pip} and python/pip on PATH, the JSON files."""
    for name in os.listdir(ROOT):
        if name in (".git", ".venv", "docs", "workdirs", "data", ".pytest_cache") or name.endswith(".egg-info"):
            continue
        os.symlink(os.path.join(ROOT, name), os.path.join(directory, name))
    shutil.copytree(os.path.join(ROOT, "docs"), os.path.join(directory, "docs"))
    program = f"#!{sys.executable}\n" + STAND_IN.format(real=sys.executable, root=ROOT, quick=QUICK,
                                                        missing_code=MISSING_EXTRA)
    for where, names in ((".venv/bin", ("python", "python3", "pip")), (".readme-bin", ("python", "python3", "pip",
                                                                                          "pip3"))):
        os.makedirs(os.path.join(directory, where))
        for name in names:
            path = os.path.join(directory, where, name)
            with open(path, "w") as f:
                f.write(program)
            os.chmod(path, 0o755)
    for block in blocks:
        if block.lang == "json":
            for name in block.files():
                os.makedirs(os.path.dirname(os.path.join(directory, name)) or directory, exist_ok=True)
                with open(os.path.join(directory, name), "w") as f:
                    f.write(block.text)


class Runner:
    """Runs blocks, each chain in its own directory, each block once per session."""

    def __init__(self, factory, blocks):
        self.factory, self.blocks, self.dirs, self.outcomes = factory, blocks, {}, {}

    def directory(self, block: Block) -> str:
        key = chain(block, self.blocks)[0].index
        if key not in self.dirs:
            self.dirs[key] = str(self.factory.mktemp("readme"))
            layout(self.dirs[key], self.blocks)
        return self.dirs[key]

    def run(self, block: Block) -> str:
        for earlier in chain(block, self.blocks):
            if earlier.index >= block.index:
                break
            if earlier.index not in self.outcomes:
                self.outcomes[earlier.index] = self._attempt(earlier)
            status, message = self.outcomes[earlier.index]
            if status == "skipped":
                pytest.skip(f"needs {earlier.id} (README line {earlier.line}), skipped: {message}")
            assert status == "ok", f"needs {earlier.id} (README line {earlier.line}) first, which failed:\n{message}"
        self.outcomes[block.index] = self._attempt(block)
        status, message = self.outcomes[block.index]
        if status == "skipped":
            pytest.skip(message)
        assert status == "ok", message
        return message

    def _attempt(self, block: Block):
        try:
            return "ok", self._run(block)
        except pytest.skip.Exception as e:
            return "skipped", str(e)
        except Exception as e:   # a failed assertion, a timeout, ...
            return "failed", f"{type(e).__name__}: {e}"

    def _run(self, block: Block) -> str:
        d = self.directory(block)
        sub = substitution(block)
        text = block.text
        if sub and sub.replace:
            assert sub.replace[0] in text
            text = text.replace(*sub.replace)
        if sub and sub.before:
            text = re.search(sub.before, open(README).read()).group(0) + "\n" + text
        log = os.path.join(d, ".readme-calls.jsonl")
        env = {**os.environ, "PATH": os.path.join(d, ".readme-bin") + os.pathsep + os.environ["PATH"],
               "HF_HUB_OFFLINE": "1", "README_TEST_LOG": log,
               "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        path = os.path.join(d, f".readme-block-{block.index:02d}.{'sh' if block.lang == 'bash' else 'py'}")
        with open(path, "w") as f:
            f.write(text)
        command = ["bash", "-e", "-o", "pipefail", path] if block.lang == "bash" else [sys.executable, path]
        calls_before = len(open(log).readlines()) if os.path.exists(log) else 0
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=d, env=env, capture_output=True, text=True, timeout=1800)
        took = time.perf_counter() - t0
        where = f"README line {block.line} ({block.id}, {took:.0f} s, in {d})"
        if block.lang == "bash" and done.returncode == MISSING_EXTRA and "README test: missing" in done.stderr:
            pytest.skip(f"{where}: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, (f"{where} exited with status {done.returncode}:\n{text}\n--- stdout (end)\n"
                                      f"{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-5000:]}")
        calls = [json.loads(line) for line in open(log).readlines()[calls_before:]] if os.path.exists(log) else []
        for call in calls:   # what every launched run must have left
            argv = call["argv"]
            if call["kind"] != "python" or "--workdir" not in " ".join(argv):
                continue
            workdir = next(a.split("=", 1)[1] if "=" in a else argv[k + 1] for k, a in enumerate(argv)
                           if a.split("=")[0] == "--workdir")
            if argv[0].endswith("scripts/train.py"):
                assert os.path.exists(os.path.join(d, workdir, "final_metrics.json")), f"{where}: {argv}"
            if argv[0].endswith("scripts/sweep.py") and "--print_commands" not in argv:
                assert os.path.exists(os.path.join(d, workdir, "results.csv")), f"{where}: {argv}"
        if block.lang == "python":
            check_output(shown_output(block.text), done.stdout, where)
        for pattern, check in CLAIMS.items():
            if re.search(pattern, block.text):
                check(d)
        return done.stdout


# ---- the tests ---------------------------------------------------------------------------------------

BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in ("bash", "python")]


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory, BLOCKS)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow_reason(b, BLOCKS) else [])
                                   for b in RUNNABLE])
def test_readme_block_runs_as_written(runner, block):
    runner.run(block)


def test_every_block_runs_or_is_substituted():
    """A new block that this test cannot run fails here, naming it: give it a language the test runs,
    make it runnable as written, or add a SUBSTITUTIONS entry with the reason."""
    readme = open(README).read()
    problems = []
    for b in BLOCKS:
        where = f"README line {b.line} ({b.id})"
        if b.lang not in ("bash", "python", "json", ""):
            problems.append(f"{where}: ```{b.lang} blocks are neither run nor data; use bash or python")
        elif b.lang == "":
            commands = [line for line in b.text.splitlines() if re.match(r"\s*(\$ |python|pip|\.venv/|bash )", line)]
            if commands:
                problems.append(f"{where}: a block without a language holds commands {commands}; mark it ```bash")
        elif b.lang == "json":
            if not b.files():
                problems.append(f"{where}: a JSON block must follow a paragraph naming its file (`data/x.jsonl`)")
            for line in b.text.splitlines() if b.files() and b.files()[0].endswith(".jsonl") else [b.text]:
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{where}: not JSON ({e}): {line[:80]}")
        elif b.lang == "bash" and not substitution(b):
            code = re.sub(r"(^|\s)#.*", "", b.text)
            placeholders = re.findall(r"\.\.\.|<[\w-]+>|\$[A-Z_]+\b|\[--[^]]*\]", code)
            if placeholders:
                problems.append(f"{where}: placeholders {placeholders} cannot run as written: write the command "
                                "out, or add a SUBSTITUTIONS entry")
    for pattern in CLAIMS:
        if not any(re.search(pattern, b.text) for b in RUNNABLE):
            problems.append(f"CLAIMS entry {pattern!r} matches no block")
    for s in SUBSTITUTIONS:
        matching = [b.id for b in BLOCKS if s.match in b.text]
        if len(matching) != 1:
            problems.append(f"SUBSTITUTIONS entry {s.match!r} matches {matching}, not exactly one block")
        if s.before and not re.search(s.before, readme):
            problems.append(f"SUBSTITUTIONS entry {s.match!r}: README no longer says {s.before!r}")
    assert not problems, "\n".join(problems)


def test_the_harness_reads_blocks_and_shown_output():
    text = "# T\n\n## A\n\nwrite `data/x.jsonl`:\n\n```json\n{\"a\": 1}\n```\n\n```python\nprint(1)\n# 1\n```\n"
    blocks = parse(text)
    assert [(b.lang, b.section, b.line) for b in blocks] == [("json", "A", 7), ("python", "A", 11)]
    assert blocks[0].files() == ["data/x.jsonl"] and shown_output(blocks[1].text) == [["1"]]
    assert shown_output("x = 1  # not output\nprint(x)  # 1\n# no\nprint('#', x)\n# # 1\n#\n") == [["1"], ["# 1", ""]]
    check_output([["a  b", "x ... z"]], "before\na b\nx y y z\n", "here")
    with pytest.raises(AssertionError):
        check_output([["x ... z"]], "x y\n", "here")
    shared = parse("```bash\nrun --workdir workdirs/a\n```\n```bash\nuse workdirs/a workdirs/b\n```\n"
                   "```bash\nuse workdirs/b\n```\n```bash\nother workdirs/c\n```\n")
    assert [b.index for b in chain(shared[2], shared)] == [0, 1, 2] and chain(shared[3], shared) == [shared[3]]
