"""Your own data: a task from data files, a data set directory, a Hugging Face data set name or
in-memory records, read through `datasets` (Arrow, memory-mapped: a data set larger than memory
is never held as Python objects).

    --config.task.name=files --config.task.options.train=data/train.jsonl
        [--config.task.options.validation=data/validation.jsonl] [--config.task.options.test=...]
        --config.task.options.kind=classify --config.task.options.text_column=review
        --config.task.options.label_column=rating

Sources (one of):
    train / validation / test   data files (a path or glob each): .jsonl/.json, .csv, .tsv, .parquet,
                                .txt (one text per line: column "text"), read by `load_dataset`
    dataset (+ dataset_config)  a `save_to_disk` directory, a directory of data files, or a Hub
                                data set name (fetched, which needs HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
                                unset or 0; offline, only a name loaded once before is found: in the
                                Arrow cache $HF_DATASETS_CACHE/<owner>___<name>, not huggingface_hub's
                                snapshot cache, which datasets 5.2 does not read offline)

Kinds and their columns (options name them; the defaults are the common names):
    classify   text_column ("text"), label_column ("label"): labels are strings or ints. Classes are
               `label_names` if given (a comma-separated string or a list; int labels then index
               it), else a ClassLabel feature's names, else the sorted distinct training labels.
    lm         text_column
    generate   input_column ("input"), output_column ("output"): the loss is on the output
    chat       messages_column ("messages"): lists of {"role", "content"} turns (roles system, user,
               assistant, tool), rendered with the tokenizer's chat template; the loss is on the
               assistant turns only

Splits: without a validation split, `validation_fraction` of the training records (at least one)
is carved off: the first round(fraction * n) of `np.random.default_rng(split_seed).permutation(n)`,
both parts kept in file order. A test split is read when given, and evaluated only when asked
(config.eval.splits=test). `k_shot` keeps K training examples per class (classify) or in all.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import re

import numpy as np

from ptune.data.fewshot import few_shot
from ptune.data.templates import Template
from ptune.data.tokenizers import ROLES
from ptune.errors import UserError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}
COLUMNS = {"classify": ("text_column", "label_column"), "lm": ("text_column",),
           "generate": ("input_column", "output_column"), "chat": ("messages_column",)}
STANDARD = {"text_column": "text", "label_column": "label", "input_column": "input", "output_column": "output",
            "messages_column": "messages"}
DEFAULT_TEMPLATES = {"classify": "{text}\nLabel:", "generate": "{text}\n"}
QUIET_BYTES = 64 << 20   # data smaller than this is read without `datasets`' progress bars


def files(train: str = "", validation: str = "", test: str = "", dataset: str = "", dataset_config: str = "",
          kind: str = "classify", text_column: str = "text", label_column: str = "label", input_column: str = "input",
          output_column: str = "output", messages_column: str = "messages", label_names="",
          validation_fraction: float = 0.1, split_seed: int = 0, k_shot: int | None = None,
          shot_seed: int = 13) -> tasks.Task:
    """A task from data files or a data set (see the module docstring)."""
    if bool(dataset) == bool(train or validation or test):
        raise UserError("task 'files': give config.task.options.train (a data file; validation and test "
                        "optional) or config.task.options.dataset (a data set directory or Hub name), not both")
    splits, where = _load_dataset(dataset, dataset_config) if dataset else _load_files(
        {"train": train, "validation": validation, "test": test})
    return from_splits(splits, kind, where, text_column=text_column, label_column=label_column,
                       input_column=input_column, output_column=output_column, messages_column=messages_column,
                       label_names=label_names, validation_fraction=validation_fraction, split_seed=split_seed,
                       k_shot=k_shot, shot_seed=shot_seed)


def from_records(kind: str, train: list[dict], validation: list[dict] | None = None,
                 test: list[dict] | None = None, **options) -> tasks.Task:
    """A task from in-memory records, e.g. from_records("classify", [{"text": ..., "label": "spam"}, ...]);
    `options` are those of `files` that shape a task (columns, label_names, validation_fraction, ...)."""
    import datasets
    given = {s: r for s, r in {"train": train, "validation": validation, "test": test}.items() if r is not None}
    splits = {}
    for split, records in given.items():
        if not isinstance(records, list):
            raise UserError(f"from_records: {split} must be a list of dicts (records), got {type(records).__name__}")
        if not records:
            raise UserError(f"from_records: {split} is an empty list; give it records"
                            + ("" if split == "train" else f", or leave {split} out"))
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise UserError(f"from_records: {split}[{bad}] is {records[bad]!r:.80}, not a dict; give records such "
                            "as {'text': ..., 'label': ...}")
        try:
            splits[split] = datasets.Dataset.from_list(records)
        except (ValueError, TypeError) as e:   # pyarrow's, for a column whose values differ in type
            raise UserError(_mixed_types(split, records) or f"from_records: {split}: the records do not form one "
                            f"table ({' '.join(str(e).split())}); give each column values of one type") from None
    return from_splits(splits, kind, {s: f"{s} records" for s in splits}, **options)


def _mixed_types(split: str, records: list[dict]) -> str | None:
    """The first record whose value in a column has another type than the column's first value."""
    kind = lambda v: "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
    first: dict[str, tuple[int, str]] = {}
    for i, record in enumerate(records):
        for column, value in record.items():
            if value is None:
                continue
            j, seen = first.setdefault(column, (i, kind(value)))
            if kind(value) != seen:
                return (f"from_records: {split}[{i}] has {column}={value!r:.80}, a {kind(value)}, but {split}[{j}] "
                        f"has a {seen}; give column {column!r} values of one type")
    return None


def from_splits(splits: dict, kind: str, where: dict[str, str], text_column: str = "text", label_column: str = "label",
                input_column: str = "input", output_column: str = "output", messages_column: str = "messages",
                label_names="", validation_fraction: float = 0.1, split_seed: int = 0, k_shot: int | None = None,
                shot_seed: int = 13) -> tasks.Task:
    """The task of `kind` over {split: datasets.Dataset}; `where` names each split's source in errors."""
    if kind not in tasks.KINDS:
        raise UserError(f"task 'files': kind {kind!r} is not one of {tasks.KINDS} (config.task.options.kind)")
    if "train" not in splits:
        raise UserError(f"task 'files': no train split among {sorted(splits)} ({where}); give one")
    options = dict(text_column=text_column, label_column=label_column, input_column=input_column,
                   output_column=output_column, messages_column=messages_column)
    columns = {STANDARD[option]: options[option] for option in COLUMNS[kind]}
    splits = {s: _standard_columns(ds, columns, where[s]) for s, ds in splits.items()}
    names = ()
    for split, ds in splits.items():
        _check_values(ds, kind, where[split])
    if kind == "classify":
        splits, names = _encode_labels(splits, _names(label_names), where)
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve(splits["train"], validation_fraction, split_seed, where["train"])
        where["validation"] = f"validation carved from {where['train']}"
    if kind == "classify":
        _check_classes(splits["train"], names, where["train"])
    if k_shot is not None:
        splits["train"] = _few_shot(splits["train"], k_shot, shot_seed, kind == "classify", names)
    template = Template(DEFAULT_TEMPLATES.get(kind, "{text}"), tuple(f" {n}" for n in names), single_token=True)
    return tasks.Task("files", kind, splits, template, num_classes=len(names), label_names=names, files=where)


def carve(dataset, fraction: float, seed: int, where: str):
    """(train, validation): the first round(fraction * n) (at least 1) of a seeded permutation
    go to validation; both keep file order."""
    n = len(dataset)
    if not 0 < fraction < 1:
        raise UserError(f"config.task.options.validation_fraction={fraction} must be in (0, 1)")
    if n < 2:
        raise UserError(f"{where} has {n} record(s): too few to carve a validation split from; "
                        "give config.task.options.validation")
    order = np.random.default_rng(seed).permutation(n)
    held = np.zeros(n, bool)
    held[order[: min(max(round(fraction * n), 1), n - 1)]] = True
    return dataset.select(np.flatnonzero(~held)), dataset.select(np.flatnonzero(held))


def _load_files(paths: dict[str, str]):
    import datasets
    data_files, builders = {}, set()
    for split, pattern in paths.items():
        if not pattern:
            continue
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise UserError(f"config.task.options.{split}: data file {pattern!r} does not exist; fix the path")
        for path in found:
            suffix = pathlib.Path(path).suffix.lower()
            if suffix not in FORMATS:
                raise UserError(f"config.task.options.{split}: {path} has extension {suffix!r}; ptune reads "
                                f"{sorted(FORMATS)} (convert the file, or rename it if it is one of these)")
            builders.add((FORMATS[suffix], "\t" if suffix == ".tsv" else None))
        data_files[split] = found
    if len(builders) > 1:
        raise UserError(f"the data files {data_files} mix formats; give every split in one format")
    builder, delimiter = builders.pop()
    where = {s: ", ".join(f) for s, f in data_files.items()}
    size = sum(os.path.getsize(f) for fs in data_files.values() for f in fs)
    try:
        with _quiet(progress=size >= QUIET_BYTES):
            loaded = datasets.load_dataset(builder, data_files=data_files,
                                           **({"delimiter": delimiter} if delimiter else {}))
    except Exception as e:   # datasets wraps the reader's error (pyarrow, pandas) in its own types
        raise UserError(_unreadable(builder, data_files, e)) from None
    return dict(loaded), where


@contextlib.contextmanager
def _quiet(progress: bool):
    """`datasets` logs nothing below CRITICAL meanwhile (a reader's failure is logged by it and then
    raised, and ptune's error line says it once), and shows progress bars only with `progress`."""
    import datasets
    from datasets.utils import logging as datasets_logging
    verbosity, bars = datasets_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _unreadable(builder: str, data_files: dict, error: Exception) -> str:
    """One line naming the file (and line) that `load_dataset` could not read."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    files = [f for fs in data_files.values() for f in fs]
    empty = next((f for f in files if _no_records(f, builder)), None)
    if empty:
        what = "a header and no rows" if builder == "csv" and os.path.getsize(empty) else "no records"
        return f"{empty} has {what}; give it records (or leave the file out)"
    if builder == "json":
        for path in files:
            try:
                for _ in tasks.iter_jsonl(path):   # streamed: finds the bad line without holding the file
                    pass
            except ValueError as e:
                return str(e)
    text = " ".join(str(error).split())
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if builder == "csv" and fields:
        path = _file_of_error(files, text)
        return (f"{path}:{fields.group(2)}: {fields.group(3)} fields where the header has {fields.group(1)}; "
                "fix that row (quote fields that contain the delimiter)")
    return f"{', '.join(files)}: not readable as {builder} ({type(error).__name__}: {text[:300]}); fix the file"


def _no_records(path: str, builder: str) -> bool:
    """Whether a data file holds no record: no non-blank line (a CSV: none after its header), a
    Parquet file of 0 rows."""
    if builder == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:   # not Parquet at all: another message says so
            return False
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = 0
        for line in f:
            lines += bool(line.strip())
            if lines > (builder == "csv"):
                return False
    return True


def _file_of_error(files: list[str], text: str) -> str:
    return next((f for f in files if f in text), files[0] if len(files) == 1 else ", ".join(files))


def _load_dataset(name: str, config: str):
    """{split: Dataset} from a save_to_disk directory, a directory of data files, or a Hub name."""
    import datasets
    path = pathlib.Path(os.path.expanduser(name))
    local = path.exists() or name.startswith((".", "/", "~"))
    if local and not path.is_dir():
        raise UserError(f"config.task.options.dataset={name!r}: no such directory; give a data set "
                        "directory, or a data file as config.task.options.train")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if local else QUIET_BYTES
    try:   # every error of datasets' (its UserErrors may span lines) becomes one line below
        with _quiet(progress=size >= QUIET_BYTES):
            if any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path) if local else name, config or None)
    except Exception as e:
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "0") not in ("0", "")]
        if offline and not path.exists() and isinstance(e, ConnectionError):   # datasets: "Couldn't reach"
            forbid = "forbid" if len(offline) > 1 else "forbids"
            raise UserError(f"config.task.options.dataset={name!r} is not a local directory and is not in the local "
                            f"cache, and {' and '.join(offline)} {forbid} fetching it; set "
                            f"{' and '.join(v + '=0' for v in offline)} on a machine online, or give a local path"
                            ) from None
        raise UserError(f"config.task.options.dataset={name!r}: could not be loaded ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); fix the name, or choose a configuration "
                        "with config.task.options.dataset_config") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    unknown = sorted(set(loaded) - set(tasks.SPLITS))
    splits = {s: ds for s, ds in loaded.items() if s in tasks.SPLITS}
    if unknown and not splits:
        raise UserError(f"data set {name!r} has splits {unknown}, none of {tasks.SPLITS}; rename its splits")
    return splits, {s: f"{name} [{s}]" for s in splits}


def _standard_columns(dataset, columns: dict[str, str], where: str):
    """The data set with just the needed columns, under ptune's names (Arrow metadata only)."""
    present = dataset.column_names
    for standard, column in columns.items():
        if column not in present:
            option = next(o for o, s in STANDARD.items() if s == standard)
            raise UserError(f"{where}: no column {column!r} (config.task.options.{option}); columns present: "
                            f"{present}")
    if not len(dataset):
        raise UserError(f"{where} is empty; give it records")
    dataset = dataset.select_columns(list(columns.values()))
    renames = {c: s for s, c in columns.items() if c != s}
    clash = [s for s in renames.values() if s in dataset.column_names]
    if clash:   # e.g. text_column=body while another needed column is called "text"
        raise UserError(f"{where}: columns {sorted(renames)} cannot be renamed to ptune's {sorted(renames.values())}; "
                        "rename them in the data")
    return dataset.rename_columns(renames) if renames else dataset


def _names(label_names) -> tuple[str, ...]:
    if isinstance(label_names, str):
        return tuple(n.strip() for n in label_names.split(",") if n.strip())
    return tuple(str(n) for n in label_names)


def _encode_labels(splits: dict, declared: tuple[str, ...], where: dict[str, str]):
    """Labels as class indices 0..K-1 (int32) and the class names; errors name the record."""
    import datasets
    feature = splits["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel) and not declared:
        declared = tuple(feature.names)
    raw = {s: _column(ds, "label") for s, ds in splits.items()}   # raw label values per split, in order
    for split, values in raw.items():
        missing = next((i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            raise UserError(f"{where[split]} record {missing} has no label; give every record one")
    train = raw["train"]
    if declared:
        names = declared
        if _is_int(train):   # ints index the declared names
            index = lambda v: int(v) if 0 <= v < len(names) else None
        else:
            lookup = {n: i for i, n in enumerate(names)}
            index = lambda v: lookup.get(str(v))
    else:
        distinct = sorted(set(train.tolist()))
        names = tuple(str(v) for v in distinct)
        lookup = {v: i for i, v in enumerate(distinct)}
        index = lambda v: lookup.get(v)
    out = {}
    for split, values in raw.items():
        labels = np.asarray([index(v) if v is not None else None for v in values.tolist()], object)
        bad = next((i for i, label in enumerate(labels) if label is None), None)
        if bad is not None:
            source = "config.task.options.label_names" if declared else "the training labels"
            value = values[bad].item() if isinstance(values[bad], np.generic) else values[bad]   # not np.str_('x')
            raise UserError(f"{where[split]} record {bad} has label {value!r}, outside the classes "
                            f"{list(names)} (from {source}); fix the record or declare the class in "
                            "config.task.options.label_names")
        ds = splits[split].remove_columns("label")
        out[split] = ds.add_column("label", labels.astype(np.int32).tolist(),
                                   feature=datasets.Value("int32"))
    if len(names) < 2:
        raise UserError(f"{where['train']}: only one class {list(names)}; classification needs two or more, "
                        "so add examples of another class")
    return out, names


def _check_classes(train, names: tuple[str, ...], where: str):
    """Every class has a training example (checked after carving, which may take a class's only one)."""
    counts = np.bincount(_column(train, "label").astype(np.int64), minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise UserError(f"{where}: class(es) {empty} have no training example (after holding out validation "
                        "records); add some, or drop them from config.task.options.label_names")


def _column(dataset, name: str) -> np.ndarray:
    """A column's values in the data set's row order, as numpy (object dtype for strings)."""
    return np.asarray(dataset.with_format("numpy")[name], object) if dataset.num_rows else np.asarray([], object)


def _is_int(values: np.ndarray) -> bool:
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values[:1000])


def _check_values(dataset, kind: str, where: str):
    """Every record's text columns (all but a label) are strings, and a chat is turns with known roles and an
    assistant turn."""
    import datasets
    if kind == "chat":
        for start in range(0, len(dataset), 1000):
            for i, messages in enumerate(dataset[start:start + 1000]["messages"], start):
                problem = chat_problem(messages)
                if problem:
                    raise UserError(f"{where} record {i}: {problem}; fix that record")
        return
    for column in [c for c in dataset.column_names if c != "label"]:   # classes are _encode_labels' to check
        feature = dataset.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise UserError(f"{where}: column {column!r} holds {feature}, not text; give a text column")
        nulls = dataset.data.column(column).null_count
        if nulls:
            first = next(i for i, v in enumerate(dataset[column]) if v is None)
            raise UserError(f"{where} record {first} has no {column!r} ({nulls} records lack it); fix those records")


def chat_problem(messages) -> str | None:
    """What is wrong with a chat record, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {'role', 'content'} turns"
    for t, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return f"turn {t} is not a {{'role', 'content'}} object with string content"
        if turn.get("role") not in ROLES:
            return f"turn {t} has role {turn.get('role')!r}, not one of {ROLES}"
    if not any(turn["role"] == "assistant" for turn in messages):
        return "no assistant turn, so nothing would be learned from it"
    return None


def _few_shot(dataset, k: int, seed: int, per_class: bool, names: tuple[str, ...]):
    labels = _column(dataset, "label") if per_class else np.zeros(len(dataset), int)
    keyed = [{"label": int(label), "row": i} for i, label in enumerate(labels)]
    try:
        chosen = few_shot(keyed, k, seed, key="label" if per_class else None,
                          label_names=list(names) if per_class else None)
    except ValueError as e:
        raise UserError(f"config.task.options.k_shot={k}: {e}; lower k_shot or add training examples") from None
    return dataset.select([e["row"] for e in chosen])


# Last: tasks imports this module at its end to register 'files', so either may be imported first.
from ptune.data import tasks  # noqa: E402
