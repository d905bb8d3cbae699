"""Examples -> token rows -> padded (or packed) arrays -> batches whose order depends only on (seed, step).

`encode` is the one entry point. Examples are a list of dicts, or a `datasets.Dataset` (user data
through ptune.data.files), which is encoded chunk by chunk into memory-mapped arrays cached next to
the data set's own cache files, so a data set larger than memory is never held whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from ptune.data import packing
from ptune.data.templates import Template
from ptune.data.tokenizers import for_family
from ptune.errors import UserError

KINDS_THAT_PACK = ("lm", "generate", "chat")
CHUNK = 1000          # examples encoded (and packed) together when a data set is encoded in chunks
ENCODING_VERSION = 1  # bump when the encoders change, so cached encodings are not reused


def encode(examples, kind: str, template: Template, tokenizer, family: str, max_length: int,
           packed: bool = False) -> dict[str, np.ndarray]:
    """Arrays for a task of `kind` (classify | lm | generate | chat), all (N, max_length) int32:
    input_ids, attention_mask (1 = token, 0 = padding; with `packed`, the example's number 1..k
    within its row), and labels (N,) for classify or loss_mask (tokens that are predicted) else.

    Truncation: a classification text or generation input is cut from its end so that the template
    and the answer survive; an lm text or a chat is cut from its end."""
    if kind not in ROWS:
        raise UserError(f"encode: kind {kind!r} is not one of {sorted(ROWS)}")
    if not isinstance(examples, (list, tuple)) and not hasattr(examples, "_fingerprint"):
        raise UserError(f"encode: examples must be a list of dicts or a datasets.Dataset, got "
                        f"{type(examples).__name__}")
    if packed and kind not in KINDS_THAT_PACK:
        raise UserError(f"config.task.packing: a {kind} task cannot be packed (packing serves {KINDS_THAT_PACK}); "
                        "set config.task.packing=False")
    tokenizer = for_family(tokenizer, family)

    def arrays_of(records):
        rows = ROWS[kind](records, template, tokenizer, max_length)
        return packing.pack(rows, max_length, tokenizer.pad_id) if packed else pad(rows, max_length, tokenizer.pad_id)
    if isinstance(examples, (list, tuple)):
        return arrays_of(examples)
    key = [ENCODING_VERSION, examples._fingerprint, kind, template.text, template.verbalizer, tokenizer.fingerprint,
           family, max_length, packed, CHUNK]
    return _encode_dataset(examples, arrays_of, hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])


def classification_rows(examples, template: Template, tokenizer, max_length: int) -> list[dict]:
    """The template around each text; only the text is cut, so the verbalizer position survives."""
    before, after = template.parts()
    head, tail = tokenizer.prefix_ids + tokenizer.encode(before), tokenizer.encode(after) + tokenizer.suffix_ids
    budget = max_length - len(head) - len(tail)
    if budget <= 0:
        raise UserError(f"task.max_length={max_length} leaves no room for text after the template "
                        f"({len(head) + len(tail)} tokens); raise it")
    return [{"input_ids": head + tokenizer.encode(e["text"])[:budget] + tail, "label": e["label"]} for e in examples]


def lm_rows(examples, template: Template, tokenizer, max_length: int) -> list[dict]:
    """The text then EOS; every token but the first is predicted."""
    rows = []
    for e in examples:
        ids = (tokenizer.prefix_ids + tokenizer.encode(e["text"]) + [tokenizer.eos_id])[:max_length]
        rows.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    return rows


def generate_rows(examples, template: Template, tokenizer, max_length: int) -> list[dict]:
    """Prompt = the template around the input, target = the output then EOS; only target tokens are
    predicted. The output keeps at most half the row; the input is cut to fit the rest. The pieces
    are encoded apart, as `prompt` does when generating (BPE merges across them differ otherwise)."""
    before, after = template.parts()
    fixed, tail = tokenizer.prefix_ids + tokenizer.encode(before), tokenizer.encode(after)
    rows = []
    for e in examples:
        output = (tokenizer.encode(e["output"]) + [tokenizer.eos_id])[: max_length // 2]
        budget = max(max_length - len(fixed) - len(tail) - len(output), 0)
        prompt = (fixed + tokenizer.encode(e["input"])[:budget] + tail)[: max_length - len(output)]
        rows.append({"input_ids": prompt + output, "loss_mask": [0] * len(prompt) + [1] * len(output)})
    return rows


def chat_rows(examples, template: Template, tokenizer, max_length: int) -> list[dict]:
    """A conversation rendered by the tokenizer's own chat template; only assistant turns (their
    text and end-of-turn tokens) are predicted. Pieces are encoded apart, as in `generate_rows`."""
    rows = []
    for e in examples:
        ids, mask = [], []
        for text, predicted in tokenizer.chat_pieces(e["messages"]):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [int(predicted)] * len(piece)
        rows.append({"input_ids": ids[:max_length], "loss_mask": [0] + mask[1:max_length]})
    return rows


ROWS = {"classify": classification_rows, "lm": lm_rows, "generate": generate_rows, "chat": chat_rows}


def prompt(tokenizer, template: Template, text: str) -> list[int]:
    """A generation prompt's ids: the tokenizer's prefix, then `text` in the template, built as
    `generate_rows` builds a training prompt (uncut)."""
    before, after = template.parts()
    return tokenizer.prefix_ids + tokenizer.encode(before) + tokenizer.encode(text) + tokenizer.encode(after)


def pad(rows: list[dict], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (N, length) input_ids / attention_mask (and loss_mask), labels (N,)."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    arrays = {"input_ids": ids, "attention_mask": np.zeros_like(ids)}
    if rows and "loss_mask" in rows[0]:
        arrays["loss_mask"] = np.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n], arrays["attention_mask"][i, :n] = row["input_ids"], 1
        if "loss_mask" in arrays:
            arrays["loss_mask"][i, :n] = row["loss_mask"]
    if rows and "label" in rows[0]:
        arrays["labels"] = np.asarray([row["label"] for row in rows], np.int32)
    return arrays


def _encode_dataset(dataset, arrays_of, key: str) -> dict[str, np.ndarray]:
    """`arrays_of` over `dataset` in chunks of CHUNK examples, written once into
    `<the data set's cache directory>/ptune-encoded-<key>/` (`<ptune cache>/encoded/` when that
    directory is read-only) and memory-mapped from there (an in-memory data set, with no cache
    files, is encoded in memory)."""
    cache = dataset.cache_files
    if not cache:
        return _concat([arrays_of(chunk) for chunk in _chunks(dataset)])
    directory = pathlib.Path(cache[0]["filename"]).parent / f"ptune-encoded-{key}"
    if not (directory / "meta.json").exists() and not os.access(directory.parent, os.W_OK):
        from ptune import assets  # a read-only data set (e.g. a shared save_to_disk copy): ptune's own cache
        directory = assets.cache_root() / "encoded" / directory.name
        directory.parent.mkdir(parents=True, exist_ok=True)
    if not (directory / "meta.json").exists():
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".ptune-encoding-", dir=directory.parent))
        try:
            _write_chunks(staging, (arrays_of(chunk) for chunk in _chunks(dataset)))
            os.replace(staging, directory)   # atomic: a half-written encoding never looks complete
        except OSError:
            if not (directory / "meta.json").exists():   # another process may have finished it first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    meta = json.loads((directory / "meta.json").read_text())
    return {name: np.memmap(directory / f"{name}.bin", dtype=dtype, mode="r", shape=(meta["rows"], *tail))
            for name, (dtype, tail) in meta["columns"].items()}


def _chunks(dataset):
    """Lists of example dicts, CHUNK at a time, read from the data set's Arrow table."""
    for columns in dataset.iter(batch_size=CHUNK):
        yield [dict(zip(columns, values)) for values in zip(*columns.values())]


def _write_chunks(directory: pathlib.Path, chunks):
    files, rows, columns = {}, 0, {}
    try:
        for arrays in chunks:
            for name, value in arrays.items():
                if name not in files:
                    files[name] = open(directory / f"{name}.bin", "wb")
                    columns[name] = (value.dtype.str, list(value.shape[1:]))
                files[name].write(np.ascontiguousarray(value).tobytes())
            rows += len(next(iter(arrays.values())))
    finally:
        for f in files.values():
            f.close()
    (directory / "meta.json").write_text(json.dumps({"rows": rows, "columns": columns}))


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def batch_at(arrays, step: int, batch_size: int, seed: int):
    """The training batch for `step`: epoch e is a permutation seeded by (seed, e)."""
    n = len(next(iter(arrays.values())))
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    if len(idx) < batch_size:   # fewer examples than one batch: wrap around
        idx = np.resize(order, batch_size)
    return {k: np.asarray(v[idx]) for k, v in arrays.items()}


def eval_batches(arrays, batch_size: int):
    """Consecutive batches in order; the last is padded by repeating rows, with `weight` 0."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        batch = {k: np.asarray(v[np.minimum(idx, n - 1)]) for k, v in arrays.items()}
        batch["weight"] = (idx < n).astype(np.float32)
        yield batch
