"""Your own data (ptune.data.files): formats, data set directories, Hub names (offline, from the
local cache), splits, chat rendering, cached encodings of large data, training on it, custom
tasks, and the bad-input catalogue of user data (`ROWS` in process, `CLI_ROWS` through
scripts/train.py: one `error:` line, exit status 2, no workdir).

datasets' Arrow cache, where ptune also caches encodings, is each test's own (the autouse
`datasets_cache` fixture), so nothing is read from or written to ~/.cache/huggingface.
"""

import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Callable, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptune.config import base_config, with_method, with_task
from ptune.data import batching, files, tasks
from ptune.data.templates import Template
from ptune.data.tokenizers import ByteTokenizer
from ptune.training import builder, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
# Three classes, so that "sorted distinct values" differs from the order of first appearance;
# the commas and quotes exercise CSV quoting.
LABELS = ("pos", "neg", "mid")
RECORDS = [{"text": f'review {i}, "quoted", {"great" if i % 3 == 0 else "so-so"}', "label": LABELS[i % 3]}
           for i in range(24)]
VALIDATION = [{"text": f"held-out review {i}", "label": LABELS[i % 3]} for i in range(6)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache in this test's tmp_path (datasets reads $HF_DATASETS_CACHE at import)."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def write(path, records):
    """`records` as a data file of the format its suffix names; returns the path as a str."""
    path = pathlib.Path(path)
    fmt = path.suffix
    if fmt in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(records[0]), delimiter="\t" if fmt == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)
    elif fmt == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise AssertionError(fmt)
    return str(path)


def rows(dataset):
    """A split as a list of dicts."""
    return dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)


# ---------------------------------------------------------------------------------------------
# Reading

@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_each_format_gives_the_same_task(tmp_path, ext):
    task = files.files(train=write(tmp_path / f"train{ext}", RECORDS),
                       validation=write(tmp_path / f"validation{ext}", VALIDATION))
    names = ("mid", "neg", "pos")   # sorted distinct training labels, not their order of appearance
    assert task.kind == "classify" and task.label_names == names and task.num_classes == 3
    for split, records in (("train", RECORDS), ("validation", VALIDATION)):
        got = rows(task.split(split))
        assert [r["text"] for r in got] == [r["text"] for r in records]
        assert [r["label"] for r in got] == [names.index(r["label"]) for r in records]
    assert task.files == {"train": str(tmp_path / f"train{ext}"), "validation": str(tmp_path / f"validation{ext}")}
    assert [v.verbalizer for v in task.templates] == [(" mid", " neg", " pos")]


def test_int_labels_and_declared_label_names(tmp_path):
    ints = [{"text": f"t{i}", "label": i % 3} for i in range(9)]
    assert files.from_records("classify", ints).label_names == ("0", "1", "2")
    path = write(tmp_path / "ints.jsonl", ints)
    for declared in ("no, maybe ,yes", ["no", "maybe", "yes"]):   # a comma string or a list; ints index it
        task = files.files(train=path, label_names=declared, validation=path)
        assert task.label_names == ("no", "maybe", "yes")
        assert [r["label"] for r in rows(task.split("train"))] == [i % 3 for i in range(9)]
    # Declared names fix the class order of string labels too.
    task = files.files(train=write(tmp_path / "s.jsonl", RECORDS), label_names="pos,neg,mid")
    assert task.label_names == LABELS
    got = {r["text"]: r["label"] for s in ("train", "validation") for r in rows(task.split(s))}
    assert got == {r["text"]: LABELS.index(r["label"]) for r in RECORDS}


def test_class_label_feature_names_from_save_to_disk(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["zero", "one", "two"])})
    make = lambda labels: datasets.Dataset.from_dict({"text": [f"x{i}" for i in range(len(labels))],
                                                      "label": labels}, features=features)
    datasets.DatasetDict({"train": make([2, 0, 1, 2, 1, 0]), "validation": make([1, 2])}).save_to_disk(
        str(tmp_path / "saved"))
    task = files.files(dataset=str(tmp_path / "saved"))
    assert task.label_names == ("zero", "one", "two")
    assert [r["label"] for r in rows(task.split("train"))] == [2, 0, 1, 2, 1, 0]
    assert [r["label"] for r in rows(task.split("validation"))] == [1, 2]
    assert task.files["train"] == f"{tmp_path / 'saved'} [train]"


def test_directory_of_data_files(tmp_path):
    directory = tmp_path / "reviews"
    directory.mkdir()
    write(directory / "train.jsonl", RECORDS)
    write(directory / "validation.jsonl", VALIDATION)
    write(directory / "test.jsonl", VALIDATION[:3])
    task = files.files(dataset=str(directory))
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 24, "validation": 6, "test": 3}
    assert task.label_names == ("mid", "neg", "pos")
    assert [r["text"] for r in rows(task.split("test"))] == [r["text"] for r in VALIDATION[:3]]


def test_txt_is_one_text_per_line_for_lm(tmp_path):
    (tmp_path / "train.txt").write_text("the first line\nthe second line\nthe third line\n")
    (tmp_path / "validation.txt").write_text("a held-out line\n")
    task = files.files(train=str(tmp_path / "train.txt"), validation=str(tmp_path / "validation.txt"), kind="lm")
    assert task.kind == "lm" and task.label_names == () and task.num_classes == 0
    assert rows(task.split("train")) == [{"text": "the first line"}, {"text": "the second line"},
                                         {"text": "the third line"}]
    assert rows(task.split("validation")) == [{"text": "a held-out line"}]


def test_files_may_be_imported_before_tasks():
    """tasks imports files at its end to register it; files imported first must not see a half-made tasks
    (the rest of this suite imports tasks first, through ptune.training.train)."""
    done = subprocess.run([sys.executable, "-c", "from ptune.data import files; from ptune.data import tasks; "
                           "print(tasks.REGISTRY['files'] is files.files)"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Hub names, offline, from the local cache.
#
# datasets 5.2's load_dataset("owner/name") never reads huggingface_hub's snapshot cache
# (<HF_HUB_CACHE>/datasets--owner--name/snapshots/<commit>/...) when offline: dataset_module_factory
# calls _raise_if_offline_mode_is_enabled() before its hf_hub_download of the card, and then falls
# back to CachedDatasetModuleFactory, which reads the Arrow cache that a first, online load writes:
# <HF_DATASETS_CACHE>/owner___name/<config>/<version>/<hash>/{name-<split>.arrow, dataset_info.json}.
# The test builds that Arrow cache (by loading a local copy named `name` and moving its cache entry
# under the owner, as a Hub load lays it out), and a snapshot-only entry that offline mode cannot use.

HUB_SCRIPT = textwrap.dedent("""
    import json
    from ptune.data import files          # first, as a user would
    from ptune.data import batching
    from ptune.data.tokenizers import ByteTokenizer
    out = {}
    task = files.files(dataset="owner/name")
    out["splits"] = {s: d.to_list() for s, d in task.splits.items()}
    out["label_names"] = list(task.label_names)
    arrays = batching.encode(task.split("train"), "classify", task.template, ByteTokenizer(), "gpt2", 32)
    out["encoded"] = str(arrays["input_ids"].filename)
    out["config b"] = len(files.files(dataset="owner/multi", dataset_config="b").split("train"))
    for name in ("owner/absent", "owner/snapshot-only", "owner/multi"):
        try:
            files.files(dataset=name)
            out[name] = "loaded"
        except ValueError as e:
            out[name] = str(e)
    print(json.dumps(out))
""")


def test_hub_name_loads_offline_from_the_local_cache(tmp_path):
    hf = tmp_path / "hf"
    source = tmp_path / "src" / "name"
    source.mkdir(parents=True)
    write(source / "train.jsonl", RECORDS[:12])
    write(source / "validation.jsonl", VALIDATION)
    datasets.load_dataset(str(source), cache_dir=str(hf / "datasets"))   # a first load's Arrow cache...
    (hf / "datasets" / "owner___name").mkdir()
    (hf / "datasets" / "name" / "default").rename(hf / "datasets" / "owner___name" / "default")   # ...of owner/name
    for config in ("a", "b"):   # owner/multi: two configurations in the cache
        entry = hf / "datasets" / "owner___multi" / config
        shutil.copytree(hf / "datasets" / "owner___name" / "default", entry)
        info = next(entry.glob("*/*/dataset_info.json"))
        info.write_text(json.dumps({**json.loads(info.read_text()), "config_name": config}))
        for arrow in info.parent.glob("name-*.arrow"):   # <data set name>-<split>.arrow
            arrow.rename(arrow.with_name(arrow.name.replace("name-", "multi-", 1)))
    snapshot = hf / "hub" / "datasets--owner--snapshot-only"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    write(snapshot / "snapshots" / ("0" * 40) / "train.jsonl", RECORDS[:12])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"),
           "HF_DATASETS_CACHE": str(hf / "datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(out["splits"]) == ["train", "validation"] and out["label_names"] == ["mid", "neg", "pos"]
    assert [r["text"] for r in out["splits"]["train"]] == [r["text"] for r in RECORDS[:12]]
    assert [r["label"] for r in out["splits"]["validation"]] == [["mid", "neg", "pos"].index(r["label"])
                                                                  for r in VALIDATION]
    encoded = pathlib.Path(out["encoded"])   # cached beside the data set's own Arrow files
    assert encoded.parent.name.startswith("ptune-encoded-")
    assert encoded.parent.parent.is_relative_to(hf / "datasets" / "owner___name")
    assert out["config b"] == 12
    multi = out["owner/multi"]   # datasets' message spans lines; ptune's is one
    assert re.fullmatch(r"config.task.options.dataset='owner/multi': could not be loaded \(ValueError: There are "
                        r"multiple 'owner/multi' configurations in the cache: (a, b|b, a) .*\); fix the name, or "
                        r"choose a configuration with config.task.options.dataset_config", multi), multi
    for name in ("owner/absent", "owner/snapshot-only"):
        message = out[name]
        assert "\n" not in message, message
        assert re.search(rf"config.task.options.dataset='{name}' is not a local directory and is not in the local "
                         r"cache, and HF_DATASETS_OFFLINE and HF_HUB_OFFLINE forbid fetching it; "
                         r"set HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 on a machine online, or give a local "
                         r"path", message), message


# ---------------------------------------------------------------------------------------------
# Splits

def test_carved_validation_is_seeded_disjoint_and_in_file_order(tmp_path):
    records = [{"text": f"line {i}"} for i in range(50)]
    path = write(tmp_path / "train.jsonl", records)
    carve = lambda **o: files.files(train=path, kind="lm", validation_fraction=0.2, **o)
    texts = lambda task, split: [r["text"] for r in rows(task.split(split))]
    a, b, other = carve(split_seed=3), carve(split_seed=3), carve(split_seed=4)
    assert texts(a, "train") == texts(b, "train") and texts(a, "validation") == texts(b, "validation")
    assert texts(a, "validation") != texts(other, "validation")
    assert len(texts(a, "validation")) == 10 and len(texts(a, "train")) == 40
    assert sorted(texts(a, "train") + texts(a, "validation"), key=lambda t: int(t.split()[1])) == \
        [r["text"] for r in records]
    for split in ("train", "validation"):   # both keep file order
        numbers = [int(t.split()[1]) for t in texts(a, split)]
        assert numbers == sorted(numbers)
    # The documented rule: the first round(fraction * n) of the seeded permutation are held out.
    held = sorted(np.random.default_rng(3).permutation(50)[:10])
    assert texts(a, "validation") == [f"line {i}" for i in held]
    assert "validation carved from" in a.files["validation"]
    # At least one record, however small the fraction.
    tiny = files.files(train=write(tmp_path / "three.jsonl", records[:3]), kind="lm", validation_fraction=0.01)
    assert len(tiny.split("validation")) == 1 and len(tiny.split("train")) == 2


def test_given_validation_is_used_as_is_and_test_only_when_given(tmp_path):
    train_path = write(tmp_path / "train.jsonl", RECORDS)
    task = files.files(train=train_path, validation=write(tmp_path / "validation.jsonl", VALIDATION))
    assert len(task.split("train")) == len(RECORDS)   # nothing carved
    assert [r["text"] for r in rows(task.split("validation"))] == [r["text"] for r in VALIDATION]
    assert "test" not in task.splits
    with pytest.raises(ValueError, match=r"task 'files' has no split 'test'; splits: \['train', 'validation'\]"):
        task.split("test")
    with_test = files.files(train=train_path, test=write(tmp_path / "test.jsonl", VALIDATION[:2]))
    assert [r["text"] for r in rows(with_test.split("test"))] == [r["text"] for r in VALIDATION[:2]]
    assert len(with_test.split("validation")) == round(0.1 * len(RECORDS))   # carved, test left alone


def test_k_shot_keeps_k_per_class(tmp_path):
    path = write(tmp_path / "train.jsonl", RECORDS)
    validation = write(tmp_path / "validation.jsonl", VALIDATION)
    task = files.files(train=path, validation=validation, k_shot=2, shot_seed=21)
    labels = [r["label"] for r in rows(task.split("train"))]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    assert rows(task.split("train")) == rows(files.files(train=path, validation=validation, k_shot=2,
                                                         shot_seed=21).split("train"))
    assert rows(task.split("train")) != rows(files.files(train=path, validation=validation, k_shot=2,
                                                         shot_seed=13).split("train"))
    assert len(task.split("validation")) == len(VALIDATION)   # evaluation stays whole
    lm = files.files(train=write(tmp_path / "lm.jsonl", [{"text": f"t{i}"} for i in range(9)]), kind="lm",
                     validation=write(tmp_path / "lmv.jsonl", [{"text": "v"}]), k_shot=4)
    assert len(lm.split("train")) == 4   # K in all for the other kinds


# ---------------------------------------------------------------------------------------------
# Chat

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "Four."}]


def test_chat_loss_is_on_assistant_contents_and_their_end_of_turn_only():
    pieces = TOK.chat_pieces(CONVERSATION)
    assert "".join(text for text, _ in pieces) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    assert [text for text, predicted in pieces if predicted] == ["Hello!<|im_end|>\n", "Four.<|im_end|>\n"]
    arrays = batching.encode([{"messages": CONVERSATION}], "chat", Template(), TOK, "gpt2", 256)
    ids, mask, attention = arrays["input_ids"][0], arrays["loss_mask"][0], arrays["attention_mask"][0]
    n = int(attention.sum())
    assert TOK.decode(ids[:n]) == "".join(text for text, _ in pieces) and not mask[n:].any()
    assert TOK.decode(ids[mask > 0]) == "Hello!<|im_end|>\nFour.<|im_end|>\n"
    # Two runs of predicted tokens, each right after an assistant header: headers, system and user turns are context.
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    assert len(starts) == 2
    assert all(TOK.decode(ids[:s]).endswith("<|im_start|>assistant\n") for s in starts)
    for context in ("Be brief.", "Hi there", "Two plus two?", "<|im_start|>assistant\n"):
        assert context not in TOK.decode(ids[mask > 0])


def test_chat_longer_than_max_length_is_cut_not_crashed():
    long_chat = [{"role": "user", "content": "question " * 30}, {"role": "assistant", "content": "answer " * 30}]
    length = len(TOK.encode("".join(t for t, _ in TOK.chat_pieces(long_chat))))
    context = len("<|im_start|>user\n" + "question " * 30 + "<|im_end|>\n<|im_start|>assistant\n")
    for max_length in (16, context + 10, length + 50):   # inside the user turn, inside the answer, past the end
        arrays = batching.encode([{"messages": long_chat}, {"messages": CONVERSATION}], "chat", Template(), TOK,
                                 "llama", max_length)
        assert arrays["input_ids"].shape == (2, max_length)
        assert arrays["attention_mask"][0].sum() == min(max_length, length)
        assert arrays["loss_mask"][0].sum() == max(min(max_length, length) - context, 0)
        packed = batching.encode([{"messages": long_chat}, {"messages": CONVERSATION}], "chat", Template(), TOK,
                                 "llama", max_length, packed=True)
        assert packed["input_ids"].shape[1] == max_length and packed["loss_mask"].sum() == \
            arrays["loss_mask"].sum()


def test_chat_task_from_files(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
    task = files.files(train=write(tmp_path / "chat.jsonl", chats), kind="chat", messages_column="messages")
    assert task.kind == "chat" and len(task.split("train")) == 9 and len(task.split("validation")) == 1
    arrays = batching.encode(task.split("train"), "chat", task.template, TOK, "gpt2", 128)
    assert isinstance(arrays["input_ids"], np.memmap)
    assert [TOK.decode(ids[m > 0]) for ids, m in zip(arrays["input_ids"], arrays["loss_mask"])] == \
        [f"{r['messages'][1]['content']}<|im_end|>\n" for r in rows(task.split("train"))]


# ---------------------------------------------------------------------------------------------
# Large data: memory-mapped, cached encodings

def test_dataset_encodings_are_memory_mapped_cached_and_keyed(tmp_path, datasets_cache, monkeypatch):
    path = write(tmp_path / "train.jsonl", RECORDS)
    task = files.files(train=path, validation=write(tmp_path / "validation.jsonl", VALIDATION))
    split = task.split("train")
    arrow_dir = pathlib.Path(split.cache_files[0]["filename"]).parent
    assert arrow_dir.is_relative_to(datasets_cache)
    encode = lambda ds, template=task.template, max_length=48: batching.encode(ds, "classify", template, TOK,
                                                                             "gpt2", max_length)
    first = encode(split)
    assert all(isinstance(a, np.memmap) for a in first.values())
    directory = pathlib.Path(first["input_ids"].filename).parent
    assert directory.parent == arrow_dir and re.fullmatch(r"ptune-encoded-[0-9a-f]{16}", directory.name)
    assert sorted(p.name for p in directory.iterdir()) == ["attention_mask.bin", "input_ids.bin", "labels.bin",
                                                            "meta.json"]
    # The same arrays as encoding the records in memory.
    in_memory = encode(rows(split))
    assert all(np.array_equal(first[k], in_memory[k]) for k in in_memory)
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    # Reused, not rewritten: by this data set and by a fresh read of the same file.
    write_chunks = batching._write_chunks
    monkeypatch.setattr(batching, "_write_chunks", lambda *a: pytest.fail("a cached encoding was rewritten"))
    again = files.files(train=path, validation=str(tmp_path / "validation.jsonl")).split("train")
    for ds in (split, again):
        second = encode(ds)
        assert second["input_ids"].filename == first["input_ids"].filename
        assert all(np.array_equal(first[k], second[k]) for k in first)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == mtimes
    monkeypatch.setattr(batching, "_write_chunks", write_chunks)

    # Another max_length, template or verbalizer: another key, another directory.
    others = [encode(split, max_length=40), encode(split, template=Template("Q: {text}\nA:", task.template.verbalizer)),
              encode(split, template=Template(task.template.text, ("a", "b", "c")))]
    dirs = {pathlib.Path(o["input_ids"].filename).parent for o in others}
    assert len(dirs | {directory}) == 4 and all(d.parent == arrow_dir for d in dirs)
    assert others[0]["input_ids"].shape == (len(split), 40)
    # No staging directory is left behind.
    assert not [p for p in arrow_dir.iterdir() if p.name.startswith(".ptune-encoding-")]


def files_config(train_path, validation_path, **overrides):
    """A tiny classify run on data files: gpt2-tiny, the byte tokenizer, one-byte verbalizer words."""
    config = with_task(with_method(base_config(), "lora", rank=2), "files", train=train_path,
                       validation=validation_path, label_names="neg,pos")
    config.model.checkpoint, config.model.preset = "", "gpt2-tiny"
    config.task.max_length = 32
    config.task.verbalizer = ("n", "p")
    config.train.update(steps=2, batch_size=4, eval_batch_size=8, eval_every=100, log_every=1, progress=False)
    config.checkpoint.every_steps = 1
    config.update_from_flattened_dict(overrides)
    return config


def test_train_on_files_writes_task_json_and_resumes(tmp_path, capsys):
    two = [{"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": "pos" if i % 2 else "neg"} for i in range(16)]
    train_path, validation_path = write(tmp_path / "train.jsonl", two), write(tmp_path / "validation.jsonl", two[:4])
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(files_config(train_path, validation_path), str(workdir))
    assert np.isfinite(final["validation_loss"]) and 0 <= final["validation_accuracy"] <= 1
    task_json = json.loads((workdir / "task.json").read_text())
    assert task_json == {"name": "files", "kind": "classify", "label_names": ["neg", "pos"],
                         "template": "{text}\nLabel:", "verbalizer": ["n", "p"],
                         "files": {"train": train_path, "validation": validation_path}}
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    capsys.readouterr()
    train.train_and_evaluate(files_config(train_path, validation_path, **{"train.steps": 4}), str(workdir))
    assert "resuming from step 2" in capsys.readouterr().out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
    steps = [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Custom tasks

def test_registered_builder_through_get_and_with_task(monkeypatch):
    monkeypatch.setattr(tasks, "REGISTRY", dict(tasks.REGISTRY))

    def tickets(n: int = 8, prefix: str = "ticket") -> tasks.Task:
        return files.from_records("classify", [{"text": f"{prefix} {i}", "label": ["bug", "idea"][i % 2]}
                                               for i in range(n)],
                                  validation=[{"text": "v", "label": "bug"}, {"text": "w", "label": "idea"}])
    tasks.register("tickets", tickets)
    task = tasks.get("tickets", n=12, prefix="issue")
    assert task.label_names == ("bug", "idea") and len(task.split("train")) == 12
    assert task.split("train")[0]["text"] == "issue 0"
    with pytest.raises(ValueError, match=r"task 'tickets' has no option\(s\) \['size'\]; its options are "
                                         r"\['n', 'prefix'\]"):
        tasks.get("tickets", size=3)
    with pytest.raises(ValueError, match=r"register\('broken', ...\): the builder must be a function"):
        tasks.register("broken", "not a function")

    config = with_task(with_method(base_config(), "lora"), "tickets", n=20)
    assert config.task.name == "tickets" and config.task.options.to_dict() == {"n": 20, "prefix": "ticket"}
    config.model.checkpoint, config.model.preset, config.task.objective = "", "gpt2-tiny", "head"
    config.task.max_length = 16
    config.train.update(batch_size=4, eval_batch_size=2)
    run = builder.setup(config)
    assert run.task.name == "files" and run.data["train"]["input_ids"].shape == (20, 16)
    assert run.data["train"]["labels"].tolist() == [i % 2 for i in range(20)]


def test_from_records_for_each_kind():
    classify = files.from_records("classify", [{"text": f"t{i}", "label": "ab"[i % 2], "id": i} for i in range(6)])
    assert classify.kind == "classify" and classify.label_names == ("a", "b")
    assert set(classify.split("train").column_names) == {"text", "label"}   # only the needed columns
    lm = files.from_records("lm", [{"body": f"text {i}"} for i in range(4)], text_column="body")
    assert lm.kind == "lm" and rows(lm.split("train"))[0] == {"text": "text 0"} and len(lm.split("validation")) == 1
    generate = files.from_records("generate", [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)],
                                  validation=[{"q": "qv", "a": "av"}], input_column="q", output_column="a")
    assert rows(generate.split("validation")) == [{"input": "qv", "output": "av"}]
    assert generate.template.text == "{text}\n"
    arrays = batching.encode(generate.split("validation"), "generate", generate.template, TOK, "gpt2", 16)
    assert TOK.decode(arrays["input_ids"][0][arrays["loss_mask"][0] > 0]) == "av"
    chat = files.from_records("chat", [{"messages": CONVERSATION}] * 3)
    assert chat.kind == "chat" and rows(chat.split("validation"))[0]["messages"] == CONVERSATION
    with pytest.raises(ValueError, match=r"from_records: train must be a list of dicts \(records\), got str"):
        files.from_records("lm", "some text")
    with pytest.raises(ValueError, match=r"train records record 1: turn 0 has role 'robot'"):
        files.from_records("chat", [{"messages": CONVERSATION},
                                    {"messages": [{"role": "robot", "content": "x"}]}])


def test_long_texts_are_cut_to_max_length(tmp_path):
    """A text longer than the context is cut (the template's end survives); rows have max_length tokens."""
    long = [{"text": "word " * 400, "label": "ab"[i % 2]} for i in range(6)]
    task = files.files(train=write(tmp_path / "long.jsonl", long), validation=write(tmp_path / "v.jsonl", long[:2]))
    for split in ("train", "validation"):
        arrays = batching.encode(task.split(split), "classify", task.template, TOK, "gpt2", 32)
        assert isinstance(arrays["input_ids"], np.memmap) and arrays["input_ids"].shape == (len(task.split(split)), 32)
        assert np.asarray(arrays["attention_mask"]).sum(1).tolist() == [32] * len(task.split(split))
        text, end = TOK.decode(arrays["input_ids"][0]).split("\n")   # the text is cut, not the template
        assert end == "Label:" and long[0]["text"].startswith(text) and len(text) < len(long[0]["text"])
    generate = files.from_records("generate", [{"input": "in " * 100, "output": "out " * 100}] * 2)
    arrays = batching.encode(generate.split("train"), "generate", generate.template, TOK, "gpt2", 32)
    assert arrays["input_ids"].shape == (1, 32) and arrays["loss_mask"].sum() == 16   # the output keeps half
    lm = files.from_records("lm", [{"text": "word " * 100}] * 2)
    assert batching.encode(lm.split("train"), "lm", lm.template, TOK, "gpt2", 32)["attention_mask"].sum() == 32


# ---------------------------------------------------------------------------------------------
# The bad-input catalogue of user data. Every row fails with ONE line naming the culprit (file,
# file:line, column, record or config key) and the fix, before the workdir exists.

CHATS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
         for i in range(6)]


class Row(NamedTuple):
    name: str
    make: Callable      # tmp_path -> the config that must be refused (its data files written)
    culprit: str        # regex: what is at fault
    fix: str            # regex: what to do about it


def data(tmp, name="train.jsonl", records=RECORDS):
    return write(tmp / name, records)


def files_row(name, culprit, fix, options, **overrides):
    """A run of experiments/your_data.py-like config whose task options are `options(tmp)`."""
    def make(tmp):
        config = with_task(with_method(base_config(), "lora"), "files", **options(tmp))
        config.model.checkpoint, config.model.preset, config.task.max_length = "", "gpt2-tiny", 32
        config.task.objective = "head"   # the byte tokenizer makes no single-token label words
        config.train.update(steps=2, batch_size=4, eval_batch_size=8, progress=False)
        config.update_from_flattened_dict(overrides)
        return config
    return Row(name, make, culprit, fix)


def text_file(name, text):
    def options(tmp):
        (tmp / name).write_text(text)
        return {"train": str(tmp / name)}
    return options


def edited_line(number, line):
    def options(tmp):
        lines = [json.dumps(r) for r in RECORDS]
        lines[number - 1] = line
        (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
        return {"train": str(tmp / "train.jsonl")}
    return options


def chat_with(index, messages):
    def options(tmp):
        chats = [dict(c) for c in CHATS]
        chats[index] = {"messages": messages}
        return {"kind": "chat", "train": data(tmp, "chat.jsonl", chats)}
    return options


ROWS = [
    # where the data is
    files_row("missing data file", r"config.task.options.train: data file '.*/nope.jsonl' does not exist",
              r"fix the path", lambda tmp: {"train": str(tmp / "nope.jsonl")}),
    files_row("unknown extension", r"config.task.options.train: .*/reviews.xlsx has extension '.xlsx'",
              r"ptune reads \['.csv', '.json', '.jsonl', '.parquet', '.tsv', '.txt'\] \(convert the file",
              text_file("reviews.xlsx", "text,label\n")),
    files_row("formats mixed across splits", r"the data files .*train.jsonl.*v.csv.* mix formats",
              r"give every split in one format",
              lambda tmp: {"train": data(tmp), "validation": write(tmp / "v.csv", VALIDATION)}),
    files_row("train and dataset both given", r"give config.task.options.train .* or config.task.options.dataset",
              r"not both", lambda tmp: {"train": data(tmp), "dataset": str(tmp)}),
    files_row("dataset directory missing", r"config.task.options.dataset='\./no-such-dir': no such directory",
              r"give a data set directory, or a data file as config.task.options.train",
              lambda tmp: {"dataset": "./no-such-dir"}),
    files_row("unknown kind", r"kind 'image' is not one of \('classify', 'lm', 'generate', 'chat'\)",
              r"\(config.task.options.kind\)", lambda tmp: {"train": data(tmp), "kind": "image"}),
    # what is in the files
    files_row("empty data file", r".*/train.jsonl has no records", r"give it records",
              text_file("train.jsonl", "")),
    files_row("empty validation file", r".*/validation.jsonl has no records", r"give it records",
              lambda tmp: {"train": data(tmp), "validation": data(tmp, "validation.jsonl", [])}),
    files_row("CSV with a header only", r".*/train.csv has a header and no rows", r"give it records",
              text_file("train.csv", "text,label\n")),
    files_row("CSV row with a wrong field count", r".*/train.csv:4: 3 fields where the header has 2",
              r"fix that row \(quote fields that contain the delimiter\)",
              text_file("train.csv", "text,label\nfine,pos\nalso fine,neg\nnot, fine,pos\nok,neg\n")),
    files_row("JSONL line that is not JSON", r".*/train.jsonl:5: not valid JSON", r"fix or delete that line",
              edited_line(5, '{"text": "cut off", "label": ')),
    files_row("JSONL line that is not an object", r".*/train.jsonl:2: a JSON list, not an object",
              r"fix or delete that line", edited_line(2, '["text", "pos"]')),
    files_row("absent text column", r".*/train.jsonl: no column 'review' \(config.task.options.text_column\)",
              r"columns present: \['text', 'label'\]", lambda tmp: {"train": data(tmp), "text_column": "review"}),
    files_row("absent label column", r"no column 'rating' \(config.task.options.label_column\)",
              r"columns present: \['text', 'label'\]", lambda tmp: {"train": data(tmp), "label_column": "rating"}),
    files_row("text column that is not text", r".*/train.jsonl: column 'text' holds Value\('int64'\), not text",
              r"give a text column", lambda tmp: {"train": data(tmp, records=[{"text": i} for i in range(5)]),
                                                  "kind": "lm"}),
    files_row("record without a label", r".*/train.jsonl record 3 has no label", r"give every record one",
              lambda tmp: {"train": data(tmp, records=RECORDS[:3] + [{"text": "unlabelled"}] + RECORDS[3:])}),
    files_row("label outside the declared classes",
              r".*/train.jsonl record 0 has label 'pos', outside the classes \['mid', 'neg'\] "
              r"\(from config.task.options.label_names\)",
              r"fix the record or declare the class in config.task.options.label_names",
              lambda tmp: {"train": data(tmp), "label_names": "mid,neg"}),
    files_row("validation label unseen in training",
              r".*/validation.jsonl record 1 has label 'meh', outside the classes \['mid', 'neg', 'pos'\] "
              r"\(from the training labels\)", r"declare the class in config.task.options.label_names",
              lambda tmp: {"train": data(tmp), "validation": data(tmp, "validation.jsonl",
                                                                  [VALIDATION[0], {"text": "x", "label": "meh"}])}),
    files_row("int label past the declared classes", r"record 2 has label 5, outside the classes \['no', 'yes'\]",
              r"fix the record",
              lambda tmp: {"train": data(tmp, records=[{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                                       {"text": "c", "label": 5}]), "label_names": ["no", "yes"]}),
    files_row("class with no training example", r".*/train.jsonl: class\(es\) \['neutral'\] have no training example",
              r"add some, or drop them from config.task.options.label_names",
              lambda tmp: {"train": data(tmp), "label_names": "mid,neg,neutral,pos"}),
    files_row("a single class", r"only one class \['pos'\]", r"add examples of another class",
              lambda tmp: {"train": data(tmp, records=[RECORDS[0]] * 4)}),
    files_row("k_shot above a class's count", r"config.task.options.k_shot=9: .*class 0 \('mid'\) has only 8",
              r"lower k_shot or add training examples",
              lambda tmp: {"train": data(tmp), "validation": data(tmp, "v.jsonl", VALIDATION), "k_shot": 9}),
    files_row("validation_fraction out of range", r"config.task.options.validation_fraction=1.5",
              r"must be in \(0, 1\)", lambda tmp: {"train": data(tmp), "validation_fraction": 1.5}),
    files_row("too few records to carve", r".*/one.jsonl has 1 record\(s\): too few to carve a validation split",
              r"give config.task.options.validation",
              lambda tmp: {"train": data(tmp, "one.jsonl", [{"text": "alone"}]), "kind": "lm"}),
    files_row("generate record without an output", r".*/g.jsonl record 1 has no 'output'", r"fix those records",
              lambda tmp: {"kind": "generate", "train": data(tmp, "g.jsonl", [{"input": "a", "output": "b"},
                                                                              {"input": "c"}])}),
    files_row("chat turn with an unknown role",
              r".*/chat.jsonl record 3: turn 1 has role 'bot', not one of \('system', 'user', 'assistant', 'tool'\)",
              r"fix that record", chat_with(3, [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])),
    files_row("chat without an assistant turn", r".*/chat.jsonl record 2: no assistant turn", r"fix that record",
              chat_with(2, [{"role": "user", "content": "anyone?"}])),
    files_row("chat turn without content", r".*/chat.jsonl record 1: turn 0 is not a \{'role', 'content'\} object",
              r"fix that record", chat_with(1, [{"role": "user"}, {"role": "assistant", "content": "y"}])),
    # the config around the data
    files_row("template without {text}", r"config.task.template='Review: \\nLabel:'",
              r"must contain the '\{text\}' field exactly once", lambda tmp: {"train": data(tmp)},
              **{"task.template": "Review: \nLabel:"}),
    files_row("verbalizer of the wrong length",
              r"config.task.verbalizer has 2 word\(s\) \['a', 'b'\] but task 'files' has 3 classes "
              r"\['mid', 'neg', 'pos'\]", r"give one word per class", lambda tmp: {"train": data(tmp)},
              **{"task.verbalizer": ("a", "b"), "task.objective": "verbalizer"}),
    files_row("verbalizer word of several tokens", r"verbalizer word 'neg' is 3 tokens \['n', 'e', 'g'\]",
              r"choose a single-token word .* in config.task.verbalizer, or use config.task.objective='head'",
              lambda tmp: {"train": data(tmp)}, **{"task.verbalizer": ("m", "neg", "p"), "task.objective": "auto"}),
    files_row("packing a classify task", r"config.task.packing: a classify task cannot be packed",
              r"packing serves \('lm', 'generate', 'chat'\)", lambda tmp: {"train": data(tmp)},
              **{"task.packing": True}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_data(row, tmp_path):
    config = row.make(tmp_path)
    workdir = tmp_path / "work"
    with pytest.raises(ValueError) as error:
        train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert "\n" not in message, message
    assert re.search(row.culprit, message), message
    assert re.search(row.fix, message), message
    assert not workdir.exists()


class CliRow(NamedTuple):
    name: str
    flags: Callable     # tmp_path -> scripts/train.py flags after --config/--workdir and the tiny model's
    culprit: str
    fix: str
    kind: str = "classify"


def _bad_csv(tmp):
    (tmp / "train.csv").write_text("text,label\nfine,pos\nalso fine,neg\nnot, fine,pos\nok,neg\n")
    return [f"--config.task.options.train={tmp / 'train.csv'}"]


CLI_ROWS = [
    # datasets logs the reader's failure (and shows a progress bar) itself; ptune's one line replaces both.
    CliRow("cli: CSV row with a wrong field count", _bad_csv, r".*/train.csv:4: 3 fields where the header has 2",
           r"fix that row"),
    CliRow("cli: chat turn with an unknown role",
           lambda tmp: [f"--config.task.options.train="
                        f"{data(tmp, 'chat.jsonl', CHATS[:2] + [{'messages': [{'role': 'bot', 'content': 'x'}]}])}"],
           r".*/chat.jsonl record 2: turn 0 has role 'bot'", r"fix that record", kind="chat"),
    # scripts/train.py sets HF_HUB_OFFLINE=1 unless it is set.
    CliRow("cli: Hub name not in the cache, offline",
           lambda tmp: ["--config.task.options.dataset=someone/not-cached-anywhere"],
           r"config.task.options.dataset='someone/not-cached-anywhere' is not a local directory and is not in the "
           r"local cache, and HF_HUB_OFFLINE forbids fetching it",
           r"set HF_HUB_OFFLINE=0 on a machine online, or give a local path"),
]


@pytest.fixture(scope="module", autouse=True)
def cli_launches(request, tmp_path_factory):
    """Every selected CLI row's (workdir, process), launched when this module starts, so that the
    launchers' imports overlap the in-process tests; the CLI tests wait for them."""
    selected = {item.callspec.params["row"].name for item in request.session.items
                if item.originalname == "test_bad_data_on_the_command_line"}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    started = {}
    for row in (r for r in CLI_ROWS if r.name in selected):
        tmp = tmp_path_factory.mktemp("cli")
        env_row = {**env, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
                   "HF_HOME": str(tmp / "hf")}
        cmd = [sys.executable, str(ROOT / "scripts/train.py"),
               "--config", f"{ROOT / 'experiments/your_data.py'}:{row.kind}", f"--workdir={tmp / 'work'}",
               "--config.model.checkpoint=", "--config.model.preset=gpt2-tiny", "--config.task.max_length=64",
               "--config.train.progress=False", *row.flags(tmp)]
        started[row.name] = tmp / "work", subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                           text=True, env=env_row, cwd=tmp)
    yield started
    for _, proc in started.values():
        if proc.poll() is None:   # a CLI test that did not run (or failed before waiting)
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.name for r in CLI_ROWS])
def test_bad_data_on_the_command_line(row, cli_launches):
    workdir, proc = cli_launches[row.name]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert re.search(row.culprit, lines[0]) and re.search(row.fix, lines[0]), lines[0]
    assert not workdir.exists()
