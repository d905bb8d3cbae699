"""Tasks: named data sets with splits, a kind, and manual prompt templates.

A task builder takes options and returns a `Task`; `get(name, **options)` looks it up.

Synthetic tasks (no files): `synthetic_sentiment`, `synthetic_lm`.
Real tasks read the JSONL that `ptune.assets` converts (fetched on first use; see that
module for sources, licences, split rules and counts):

| task | kind | classes | options |
|---|---|---|---|
| `sentiment` | classify | negative, positive | `domain` = all, amazon, imdb, yelp |
| `spam` | classify | ham, spam | |
| `topic` | classify | 25 fortune-file topics | |
| `genre` | classify | 15 Brown genres | |
| `brown_lm` | lm | | `genre` (one Brown genre, or None for all) |
| `chatterbot_qa` | generate | | (`{"input", "output"}` examples; `{text}` is the input) |
| `files` | any | from the data | your own data: files, a data set or a Hub name (`ptune.data.files`) |

Every classification task also takes `k_shot` (K training examples per class, drawn by
`fewshot.few_shot`; validation and test stay whole) and `shot_seed` (LM-BFF's seeds are
13, 21, 42, 87, 100); `chatterbot_qa` takes them too, as K examples in all.

`register(name, builder)` adds a task (a builder is any function of options returning a `Task`);
`files.from_records(kind, train=[...])` makes one from in-memory records.

The shipped splits are read with the json module, not `datasets.load_dataset("json", ...)`, which reads
the same files: measured on the genre task (19k records), 0.04 s against 1.1 s the first
time (0.8 s of it importing `datasets`, plus an Arrow copy under ~/.cache/huggingface) and
0.56 s after.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
from collections.abc import Callable

from ptune.data import synthetic
from ptune.data.fewshot import few_shot
from ptune.data.templates import Template
from ptune.errors import UserError

KINDS = ("classify", "lm", "generate", "chat")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Task:
    """`splits` hold examples: {"text", "label": int} for classify, {"text"} for lm,
    {"input", "output"} for generate, {"messages": [{"role", "content"}, ...]} for chat (other
    fields are carried along), as a list of dicts or a `datasets.Dataset` (ptune.data.files). `templates` are
    paraphrased manual prompts, each with a verbalizer of `num_classes` words for classify
    tasks; `template` is the default one (templates[0] unless given)."""
    name: str
    kind: str
    splits: dict[str, list[dict]]
    template: Template = Template()
    num_classes: int = 0
    templates: tuple[Template, ...] = ()
    label_names: tuple[str, ...] = ()
    files: dict[str, str] = dataclasses.field(default_factory=dict)   # split -> the file it was read from

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.templates:
            object.__setattr__(self, "templates", (self.template,))
        elif self.template == Template():
            object.__setattr__(self, "template", self.templates[0])
        if self.label_names and len(self.label_names) != self.num_classes:
            raise UserError(f"task {self.name!r}: {len(self.label_names)} label names for "
                            f"{self.num_classes} classes")
        for t in self.templates:
            if self.kind == "classify" and t.verbalizer and len(t.verbalizer) != self.num_classes:
                raise UserError(f"task {self.name!r}: template {t.text!r} has {len(t.verbalizer)} verbalizer "
                                f"words for {self.num_classes} classes")

    def split(self, name: str) -> list[dict]:
        if name not in self.splits:
            raise UserError(f"task {self.name!r} has no split {name!r}; splits: {sorted(self.splits)}")
        examples = self.splits[name]
        where = f"task {self.name!r}: split {name!r}" + (f" ({self.files[name]})" if name in self.files else "")
        if not len(examples):
            raise UserError(f"{where} is empty; give it examples (or check the task's options)")
        if not isinstance(examples, list):   # a data set from ptune.data.files, checked column-wise on loading
            return examples
        if self.kind == "classify":
            bad = next((i for i, e in enumerate(examples)
                        if type(e.get("label")) is not int or e["label"] not in range(self.num_classes)), None)
            if bad is not None:
                names = f" ({', '.join(self.label_names)})" if self.label_names else ""
                raise UserError(f"{where} example {bad} has label {examples[bad].get('label')!r}, outside the "
                                f"label set 0..{self.num_classes - 1}{names}; fix that example's label")
        if self.kind == "generate":
            bad = next((i for i, e in enumerate(examples)
                        if not (isinstance(e.get("input"), str) and isinstance(e.get("output"), str))), None)
            if bad is not None:
                raise UserError(f"{where} example {bad} lacks a string 'input' and 'output': "
                                f"{str(examples[bad])[:200]}; fix that example")
        return examples


def synthetic_sentiment(n_train: int = 512, n_eval: int = 256, seed: int = 0) -> Task:
    """Binary sentiment over generated sentences; the template asks the LM for 'good'/'bad'."""
    make = lambda n, s: synthetic.sentiment_sentences(n, s)
    return Task("synthetic_sentiment", "classify",
                {"train": make(n_train, seed), "validation": make(n_eval, seed + 1), "test": make(n_eval, seed + 2)},
                Template("{text}. Overall it was ", ("bad", "good")), num_classes=2)


def synthetic_lm(n_train: int = 512, n_eval: int = 128, seed: int = 0) -> Task:
    """Language modelling on the same generated sentences."""
    strip = lambda xs: [{"text": x["text"]} for x in xs]
    return Task("synthetic_lm", "lm",
                {"train": strip(synthetic.sentiment_sentences(n_train, seed)),
                 "validation": strip(synthetic.sentiment_sentences(n_eval, seed + 1))})


# ---------------------------------------------------------------------------------------------
# Manual prompts. Verbalizer words carry a leading space and, under a GPT-2/LLaMA-style BPE
# (checked with SmolLM2's tokenizer), every class's word starts with its own token.

SENTIMENT_TEMPLATES = (   # negative, positive
    Template("Review: {text}\nSentiment:", (" negative", " positive")),
    Template("{text} All in all, it was", (" terrible", " great")),
    Template("{text} It was", (" bad", " good")),
    Template("Review: {text}\nDid the reviewer like it? Answer:", (" No", " Yes")),
    Template("{text}\nIs this review positive or negative? It is", (" negative", " positive")),
    Template("Customer review: \"{text}\"\nThe customer was", (" unhappy", " happy")),
    Template("{text} In summary, the experience was", (" awful", " excellent")),
    Template("Text: {text}\nQuestion: Is the sentiment of this text positive or negative?\nAnswer:",
             (" negative", " positive")),
)

SPAM_TEMPLATES = (   # ham, spam
    Template("Email: {text}\nIs this email spam? Answer:", (" No", " Yes")),
    Template("{text}\nThis message is", (" legitimate", " spam")),
    Template("Message: {text}\nCategory:", (" ham", " spam")),
    Template("Classify the email as spam or ham.\n\n{text}\n\nLabel:", (" ham", " spam")),
    Template("{text}\n\nQuestion: Is the message above unsolicited junk mail?\nAnswer:", (" No", " Yes")),
    Template("Here is an email:\n{text}\nThe email is", (" normal", " junk")),
    Template("{text}\nSpam filter verdict:", (" clean", " spam")),
    Template("{text}\nThis email looks", (" genuine", " suspicious")),
)

TOPIC_PROMPTS = (
    "Quote: {text}\nTopic:",
    "{text}\nThis fortune is about",
    "Fortune cookie: {text}\nCategory:",
    "{text}\n\nWhat is the topic of this quote? Answer:",
    "Text: {text}\nSubject:",
    "Here is a saying:\n{text}\nIt belongs to the category",
    "{text}\n(filed under:",
    "Classify the fortune by topic.\n{text}\nTopic:",
)
TOPIC_WORDS = {   # fortune file -> label word
    "art": " art", "computers": " computers", "definitions": " definitions", "disclaimer": " disclaimer",
    "drugs": " drugs", "education": " education", "ethnic": " ethnic", "food": " food", "humorists": " humor",
    "kids": " kids", "law": " law", "linux": " Linux", "love": " love", "men-women": " relationships",
    "people": " people", "perl": " Perl", "platitudes": " platitudes", "politics": " politics",
    "science": " science", "songs-poems": " poetry", "sports": " sports", "startrek": " Star",
    "wisdom": " wisdom", "work": " work", "zippy": " Zippy",
}

GENRE_PROMPTS = (
    "Passage: {text}\nGenre:",
    "{text}\nThis passage comes from the genre:",
    "Text: {text}\nWhat kind of writing is this? Answer:",
    "{text}\n\nCategory of this excerpt:",
    "Brown corpus passage:\n{text}\nGenre label:",
    "Read the passage and name its genre.\n{text}\nGenre:",
    "{text}\nThe section of the library this belongs to:",
    "Excerpt: \"{text}\"\nType of text:",
)
GENRE_WORDS = {   # Brown category -> label word
    "adventure": " adventure", "belles_lettres": " essay", "editorial": " editorial", "fiction": " fiction",
    "government": " government", "hobbies": " hobbies", "humor": " humor", "learned": " academic",
    "lore": " lore", "mystery": " mystery", "news": " news", "religion": " religion", "reviews": " review",
    "romance": " romance", "science_fiction": " sci-fi",
}

CHAT_TEMPLATES = (
    Template("User: {text}\nBot:"),
    Template("Q: {text}\nA:"),
    Template("Question: {text}\nAnswer:"),
)


# ---------------------------------------------------------------------------------------------
# Real tasks.

def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line is an error naming file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | pathlib.Path):
    """The records of `read_jsonl`, one at a time."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e}); fix or delete that line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; "
                                "fix or delete that line")
            yield record


def load_dataset(dataset: str) -> tuple[dict[str, list[dict]], dict]:
    """({split: records}, meta) of a converted data set, fetching it on first use; meta["files"]
    becomes {split: path of its file}."""
    from ptune import assets  # late: keeps `import ptune.data.tasks` free of the asset machinery
    directory = assets.ensure(dataset)
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    meta["paths"] = {s: str(directory / f"{s}.jsonl") for s in SPLITS}
    return {s: read_jsonl(meta["paths"][s]) for s in SPLITS}, meta


def _with_words(prompts, words: dict[str, str], label_names, task: str) -> tuple[Template, ...]:
    missing = [n for n in label_names if n not in words]
    if missing:
        raise UserError(f"task {task!r}: no label word for class(es) {missing}; add them to the task's word table")
    return tuple(Template(p, tuple(words[n] for n in label_names)) for p in prompts)


def _classification(name: str, dataset: str, templates, k_shot: int | None, shot_seed: int,
                    words: dict[str, str] | None = None) -> Task:
    splits, meta = load_dataset(dataset)
    label_names = tuple(meta["label_names"])
    if words is not None:
        templates = _with_words(templates, words, label_names, name)
    if k_shot is not None:
        splits["train"] = few_shot(splits["train"], k_shot, shot_seed, label_names=label_names)
    return Task(name, "classify", splits, templates=templates, num_classes=len(label_names), label_names=label_names,
                files=meta["paths"])


SENTIMENT_DOMAINS = ("all", "amazon", "imdb", "yelp")


def sentiment(domain: str = "all", k_shot: int | None = None, shot_seed: int = 13) -> Task:
    """UCI sentiment sentences (Amazon, IMDB, Yelp; 1,000 each): negative 0, positive 1."""
    if domain not in SENTIMENT_DOMAINS:
        raise UserError(f"task 'sentiment': domain {domain!r} is not one of {SENTIMENT_DOMAINS}")
    dataset = "sentiment" if domain == "all" else f"sentiment_{domain}"
    return _classification(dataset, dataset, SENTIMENT_TEMPLATES, k_shot, shot_seed)


def spam(k_shot: int | None = None, shot_seed: int = 13) -> Task:
    """SpamAssassin emails (subject + body, <= 2,000 chars): ham 0, spam 1."""
    return _classification("spam", "spam", SPAM_TEMPLATES, k_shot, shot_seed)


def topic(k_shot: int | None = None, shot_seed: int = 13) -> Task:
    """Fortunes classified by the file (topic) they come from: 25 classes."""
    return _classification("topic", "topic", TOPIC_PROMPTS, k_shot, shot_seed, TOPIC_WORDS)


def genre(k_shot: int | None = None, shot_seed: int = 13) -> Task:
    """Three-sentence Brown corpus passages classified by genre: 15 classes, split by document."""
    return _classification("genre", "genre", GENRE_PROMPTS, k_shot, shot_seed, GENRE_WORDS)


def brown_lm(genre: str | None = None) -> Task:
    """Language modelling on whole Brown documents (the genre task's document split)."""
    splits, _ = load_dataset("brown_lm")
    if genre is not None:
        known = sorted({r["genre"] for s in splits.values() for r in s})
        if genre not in known:
            raise UserError(f"task 'brown_lm': genre {genre!r} is not one of {known}")
        splits = {s: [r for r in records if r["genre"] == genre] for s, records in splits.items()}
    return Task("brown_lm" if genre is None else f"brown_lm_{genre}", "lm", splits)


def chatterbot_qa(k_shot: int | None = None, shot_seed: int = 13) -> Task:
    """ChatterBot corpus (English) input -> output pairs; `k_shot` keeps K training pairs in all."""
    splits, _ = load_dataset("chatterbot_qa")
    if k_shot is not None:
        splits["train"] = few_shot(splits["train"], k_shot, shot_seed, key=None)
    return Task("chatterbot_qa", "generate", splits, templates=CHAT_TEMPLATES)


def head(examples, n: int | None):
    """The first `n` examples (all with None) of a list or a data set."""
    if n is None or n >= len(examples):
        return examples
    return examples[:n] if isinstance(examples, list) else examples.select(range(n))


REGISTRY: dict[str, Callable[..., Task]] = {
    "synthetic_sentiment": synthetic_sentiment, "synthetic_lm": synthetic_lm,
    "sentiment": sentiment, "spam": spam, "topic": topic, "genre": genre, "brown_lm": brown_lm,
    "chatterbot_qa": chatterbot_qa,
}


def class_names(task: Task, template) -> tuple[str, ...]:
    """What a predicted class index means: the task's label names, else its template's verbalizer
    words; () for tasks that do not classify."""
    if task.kind != "classify":
        return ()
    return task.label_names or tuple(w.strip() for w in template.verbalizer) or tuple(
        str(k) for k in range(task.num_classes))


def register(name: str, builder: Callable[..., Task]) -> None:
    """Make `builder` (options -> Task) the task `name`, for config.task.name and `get`; its keyword
    arguments are the task's options (config.task.options)."""
    if not callable(builder):
        raise UserError(f"register({name!r}, ...): the builder must be a function of options returning a Task")
    REGISTRY[name] = builder


def get(name: str, **options) -> Task:
    if name not in REGISTRY:
        raise UserError(f"unknown task {name!r}; choose one of {sorted(REGISTRY)}")
    allowed = list(inspect.signature(REGISTRY[name]).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"task {name!r} has no option(s) {unknown}; its options are {allowed}")
    return REGISTRY[name](**options)


from ptune.data import files  # noqa: E402  (files builds Tasks, so it is imported after them)

register("files", files.files)
