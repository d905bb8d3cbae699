"""The asset manager: pins, atomic installs, converters and their documented counts.

Tests on real data call `assets.ensure` (CI runs `python scripts/assets.py fetch all` first;
without a cache they fetch). Tests that tamper work on copies in a temporary cache."""

import collections
import json
import pathlib
import runpy
import shutil

import pytest

from ptune import assets, atomic
from ptune.data import converters

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (train, validation, test), as documented in ptune/assets.py
COUNTS = {
    "sentiment_amazon": (800, 100, 100), "sentiment_imdb": (800, 100, 100), "sentiment_yelp": (800, 100, 100),
    "sentiment": (2400, 300, 300), "spam": (4836, 605, 605), "topic": (9101, 1138, 1138),
    "genre": (15149, 1986, 2142), "brown_lm": (396, 52, 52), "chatterbot_qa": (983, 123, 123),
}


def read(directory, split):
    with open(pathlib.Path(directory) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def meta(directory):
    return json.loads((pathlib.Path(directory) / "meta.json").read_text())


def copy_source(name, cache):
    """Copy the installed source `name` from the real cache into the temporary `cache`."""
    assets.ensure(next(a.name for a in assets.ASSETS.values() if a.source == name))
    directory = assets.SOURCES[name].directory
    shutil.copytree(assets.cache_root() / directory, cache / directory)
    return cache / directory


def leftovers(cache):
    scratch = cache / ".tmp"
    return sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []


# ---------------------------------------------------------------------------------------------
# Helpers, no assets needed.

def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    with atomic.atomic_write(target) as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(target) as f:
            f.write("half-written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(tmp_path / "new.json") as f:
            f.write("x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new.json").exists() and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_split_groups_is_stratified_grouped_and_seeded():
    records = [{"text": f"t{i % 90}", "label": int(i % 90 < 30)} for i in range(200)]   # duplicates
    split = lambda seed: converters.split_groups(records, label=lambda r: r["label"], group=lambda r: r["text"],
                                             seed=seed)
    splits = split(0)
    assert sum(len(v) for v in splits.values()) == 200
    per = {s: collections.Counter(r["label"] for r in v) for s, v in splits.items()}
    n1 = sum(r["label"] for r in records)          # 68 positives, 132 negatives
    assert per["validation"] == per["test"] == {1: round(0.1 * n1), 0: round(0.1 * (200 - n1))}
    texts = {s: {r["text"] for r in v} for s, v in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"] \
        and not texts["validation"] & texts["test"]
    assert split(0) == splits and split(1) != splits
    with pytest.raises(ValueError, match="classes"):
        converters.split_groups([{"t": "a", "l": 0}, {"t": "a", "l": 1}], label=lambda r: r["l"], group=lambda r: r["t"])


def test_detokenize_brown_tokens():
    words = "`` Only a handful '' , the jury said ( in Atlanta ) -- `` it ' pro ' '' ; Jr. .".split()
    assert converters.detokenize(words) == "\"Only a handful\", the jury said (in Atlanta) -- \"it 'pro'\"; Jr."


def test_fortune_items_and_email_text():
    assert converters.fortune_items("one\n%\n_\bb_\bo_\bl_\bd  \n\t-- me\n%\n\n%\n") == ["one", "bold\n\t-- me"]
    raw = ("Received: from x\nSubject: =?utf-8?q?Caf=C3=A9?= deal\nContent-Type: multipart/alternative; "
           "boundary=B\n\n--B\nContent-Type: text/html\n\n<p>Buy <b>now</b>&amp;save</p><style>x{}</style>\n--B--\n")
    assert converters.email_text(raw) == "Subject: Café deal\n\nBuy now &save"
    assert converters.email_text("Subject: s\n\n" + "x" * 5000) == ("Subject: s\n\n" + "x" * 5000)[:2000]


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PTUNE_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("PTUNE_CACHE")
    assert assets.cache_root() == pathlib.Path.home() / ".cache" / "ptune"


# ---------------------------------------------------------------------------------------------
# Pins and atomic installs, on copies in a temporary cache.

def test_modified_source_is_a_checksum_error_and_converts_nothing(tmp_path):
    directory = copy_source("sentiment", tmp_path)
    data = bytearray((directory / "imdb.json").read_bytes())
    data[100] ^= 1                                   # same size: only the hash can tell
    (directory / "imdb.json").write_bytes(bytes(data))
    expected = next(sha for _, stored, _, sha in assets.PINS if stored == "imdb.json")
    with pytest.raises(assets.AssetError) as error:
        assets.ensure("sentiment_imdb", cache_dir=tmp_path)
    message = str(error.value)
    assert "imdb.json" in message and expected in message and assets.sha256(directory / "imdb.json") in message
    assert "python scripts/assets.py fetch --force" in message
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []


def test_download_not_matching_pin_installs_nothing(tmp_path, monkeypatch):
    wheel = copy_source("chatterbot", tmp_path / "real") / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"

    def fake_download(source, dest):          # the registry, served from the copy
        dest.mkdir(parents=True)
        return pathlib.Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "_download", fake_download)
    cache = tmp_path / "cache"
    assert assets.ensure("chatterbot_qa", cache_dir=cache) == cache / "data" / "chatterbot_qa"
    assert meta(cache / "data" / "chatterbot_qa")["counts"]["test"]["total"] == COUNTS["chatterbot_qa"][2]

    bad = "0" * 64
    monkeypatch.setattr(assets, "PINS", tuple((s, f, m, bad if s == "chatterbot" else h)
                                               for s, f, m, h in assets.PINS))
    fresh = tmp_path / "fresh"
    with pytest.raises(assets.AssetError) as error:
        assets.ensure("chatterbot_qa", cache_dir=fresh)
    message = str(error.value)
    assert "chatterbot_corpus-1.3.3-py2.py3-none-any.whl" in message and bad in message
    assert assets.sha256(wheel) in message
    assert not (fresh / "sources" / "chatterbot").exists() and not (fresh / "data").exists()
    assert leftovers(fresh) == []


def test_interrupted_conversion_leaves_no_data_set(tmp_path, monkeypatch):
    copy_source("sentiment", tmp_path)

    def crash(converted):
        raise KeyboardInterrupt   # after the split files were written, before meta.json

    monkeypatch.setattr(assets, "_counts", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.ensure("sentiment_yelp", cache_dir=tmp_path)
    assert not (tmp_path / "data" / "sentiment_yelp").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert len(read(assets.ensure("sentiment_yelp", cache_dir=tmp_path), "test")) == 100


def test_conversion_is_deterministic_and_rerun_skips(tmp_path):
    copy_source("sentiment", tmp_path)
    written = assets.convert("sentiment", cache_dir=tmp_path)
    assert written == ["sentiment_amazon", "sentiment_imdb", "sentiment_yelp", "sentiment"]
    for name in written:
        for split in assets.SPLITS:
            mine = (tmp_path / "data" / name / f"{split}.jsonl").read_bytes()
            assert mine == (assets.ensure(name) / f"{split}.jsonl").read_bytes(), (name, split)
    assert assets.convert("sentiment", cache_dir=tmp_path) == []


def test_verify_finds_a_modified_converted_file(tmp_path):
    copy_source("sentiment", tmp_path)
    directory = assets.ensure("sentiment_amazon", cache_dir=tmp_path)
    assert assets.verify("sentiment_amazon", cache_dir=tmp_path) == directory
    data = bytearray((directory / "test.jsonl").read_bytes())
    data[20] ^= 1
    (directory / "test.jsonl").write_bytes(bytes(data))
    assert assets.path("sentiment_amazon", cache_dir=tmp_path) == directory   # same size: path() can't tell
    with pytest.raises(assets.AssetError, match=r"checksum mismatch for .*test\.jsonl: expected sha256 [0-9a-f]{64}, "
                                                r"got [0-9a-f]{64}.*fetch --force sentiment_amazon"):
        assets.verify("sentiment_amazon", cache_dir=tmp_path)
    rows = {r["name"]: r for r in assets.status(tmp_path)}
    assert "checksum mismatch" in rows["sentiment_amazon"]["state"]
    assert rows["sentiment_imdb"]["state"] == "verified" and rows["smollm2"]["state"] == "missing"


def test_cli_status_and_fetch_errors(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "assets.py"))["main"]
    assert main(["--cache_dir", str(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "genre" in out and "missing" in out
    assert main(["fetch", "nonsense", "--cache_dir", str(tmp_path)]) == 2
    assert "unknown asset 'nonsense'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real assets.

def test_models_are_in_place_and_verified():
    gguf = assets.ensure("smollm2")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size == 98_362_432
    assert assets.verify("smollm2") == gguf
    minilm = assets.ensure("minilm")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in minilm.iterdir()}
    assert assets.verify("minilm") == minilm


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_documented_counts_and_disjoint_splits(name):
    directory = assets.ensure(name)
    info = meta(directory)
    splits = {s: read(directory, s) for s in assets.SPLITS}
    assert tuple(len(splits[s]) for s in assets.SPLITS) == COUNTS[name]
    assert tuple(info["counts"][s]["total"] for s in assets.SPLITS) == COUNTS[name]
    key = (lambda r: r["input"]) if info["kind"] == "generate" else (lambda r: r["text"])
    seen = {s: {key(r) for r in splits[s]} for s in assets.SPLITS}
    assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"] \
        and not seen["validation"] & seen["test"]
    if info["label_names"]:
        for s in assets.SPLITS:
            per = collections.Counter(r["label"] for r in splits[s])
            assert per == {i: n for i, n in enumerate(info["counts"][s]["per_label"].values()) if n}
        if name != "genre":   # stratified by record (genre is stratified by document)
            totals = collections.Counter(r["label"] for v in splits.values() for r in v)
            for s in ("validation", "test"):
                per = collections.Counter(r["label"] for r in splits[s])
                assert all(abs(per[i] - int(0.1 * n + 0.5)) <= 1 for i, n in totals.items()), s


def test_sentiment_domains_are_balanced_thousands():
    pooled = {s: [] for s in assets.SPLITS}
    for domain in ("amazon", "imdb", "yelp"):
        directory = assets.ensure(f"sentiment_{domain}")
        records = [r for s in assets.SPLITS for r in read(directory, s)]
        assert len(records) == 1000 and collections.Counter(r["label"] for r in records) == {0: 500, 1: 500}
        assert meta(directory)["label_names"] == ["negative", "positive"]
        for s in assets.SPLITS:
            assert collections.Counter(r["label"] for r in read(directory, s)) == \
                {"train": {0: 400, 1: 400}}.get(s, {0: 50, 1: 50})
            pooled[s] += [{**r, "domain": domain} for r in read(directory, s)]
    assert pooled == {s: read(assets.ensure("sentiment"), s) for s in assets.SPLITS}


def test_genre_and_brown_lm_split_by_document():
    genre, lm = assets.ensure("genre"), assets.ensure("brown_lm")
    docs = {s: {r["doc"] for r in read(genre, s)} for s in assets.SPLITS}
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"] \
        and not docs["validation"] & docs["test"]
    assert sum(len(d) for d in docs.values()) == 500
    lm_records = {s: read(lm, s) for s in assets.SPLITS}
    assert docs == {s: {r["doc"] for r in lm_records[s]} for s in assets.SPLITS}
    names = meta(genre)["label_names"]
    assert len(names) == 15
    for s in assets.SPLITS:   # every genre in every split
        assert {names[r["label"]] for r in read(genre, s)} == set(names)
        assert {r["genre"] for r in lm_records[s]} == set(names)
    news = next(r["text"] for r in lm_records["train"] + lm_records["validation"] + lm_records["test"]
                if r["doc"] == "ca01")
    assert news.startswith('The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary '
                           'election produced "no evidence" that any irregularities took place.')
    assert "/" not in news.split(".")[0]


def test_json_files_load_with_datasets(tmp_path):
    import datasets
    directory = assets.ensure("sentiment_amazon")
    loaded = datasets.load_dataset("json", data_files={s: str(directory / f"{s}.jsonl") for s in assets.SPLITS},
                                   cache_dir=str(tmp_path))
    assert {s: loaded[s].num_rows for s in assets.SPLITS} == dict(zip(assets.SPLITS, COUNTS["sentiment_amazon"]))
    assert set(loaded["train"].column_names) == {"text", "label"}
