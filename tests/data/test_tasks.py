"""Tasks: the real data tasks, their templates and verbalizers, few-shot sampling, split checks."""

import collections

import pytest

from ptune import assets
from ptune.data import tasks
from ptune.data.fewshot import SEEDS, few_shot
from ptune.data.templates import Template

CLASSIFICATION = [("sentiment", {}), ("sentiment", {"domain": "imdb"}), ("spam", {}), ("topic", {}), ("genre", {})]


@pytest.fixture(scope="module")
def classification_tasks():
    return [tasks.get(name, **options) for name, options in CLASSIFICATION]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """SmolLM2's byte-level BPE (GPT-2 style, leading-space tokens), converted once from the GGUF."""
    from ptune.models import pretrained
    return pretrained.load_tokenizer(assets.ensure("smollm2"))


def test_classification_tasks_have_eight_templates_with_full_verbalizers(classification_tasks):
    for task in classification_tasks:
        assert task.kind == "classify" and len(task.label_names) == task.num_classes >= 2
        assert len(task.templates) >= 8 and task.template == task.templates[0], task.name
        assert len({t.text for t in task.templates}) == len(task.templates), task.name
        for t in task.templates:
            assert t.text.count("{text}") == 1
            assert len(t.verbalizer) == task.num_classes, (task.name, t.text)
            assert len(set(t.verbalizer)) == task.num_classes, (task.name, t.verbalizer)
            assert all(w.startswith(" ") and w.strip() for w in t.verbalizer), (task.name, t.verbalizer)
            assert not t.text.endswith(" "), "the label word carries the space"
        assert [e["label"] for e in task.split("test")]   # labels within range, split not empty


def test_label_words_start_with_distinct_bpe_tokens(classification_tasks, bpe_tokenizer):
    for task in classification_tasks:
        for t in task.templates:
            ids = t.label_ids(bpe_tokenizer)          # raises if two classes share a first token
            assert len(set(ids)) == task.num_classes


def test_task_counts_and_kinds():
    sizes = lambda task: tuple(len(task.split(s)) for s in ("train", "validation", "test"))
    assert sizes(tasks.get("sentiment")) == (2400, 300, 300)
    assert sizes(tasks.get("sentiment", domain="yelp")) == (800, 100, 100)
    assert tasks.get("sentiment", domain="yelp").label_names == ("negative", "positive")
    assert tasks.get("spam").label_names == ("ham", "spam")
    assert tasks.get("topic").num_classes == 25 and tasks.get("genre").num_classes == 15
    lm = tasks.get("brown_lm")
    assert lm.kind == "lm" and sizes(lm) == (396, 52, 52) and all(e["text"] for e in lm.split("train"))
    news = tasks.get("brown_lm", genre="news")
    assert {e["genre"] for e in news.split("validation")} == {"news"} and len(news.split("train")) < 50
    qa = tasks.get("chatterbot_qa")
    assert qa.kind == "generate" and sizes(qa) == (983, 123, 123)
    assert all(e["input"] and e["output"] for e in qa.split("test")) and "{text}" in qa.template.text


def test_task_option_errors():
    with pytest.raises(ValueError, match="domain 'books'"):
        tasks.get("sentiment", domain="books")
    with pytest.raises(ValueError, match=r"no option\(s\) \['shots'\]"):
        tasks.get("spam", shots=4)
    with pytest.raises(ValueError, match="genre 'poetry'"):
        tasks.get("brown_lm", genre="poetry")


def test_k_shot_option_samples_train_only():
    task = tasks.get("genre", k_shot=4, shot_seed=21)
    assert collections.Counter(e["label"] for e in task.split("train")) == {i: 4 for i in range(15)}
    assert len(task.split("validation")) == 1986
    again = tasks.get("genre", k_shot=4, shot_seed=21).split("train")
    assert again == task.split("train") != tasks.get("genre", k_shot=4, shot_seed=42).split("train")
    assert len(tasks.get("chatterbot_qa", k_shot=16).split("train")) == 16
    with pytest.raises(ValueError, match=r"class \d+ \('science_fiction'\) has only 205 examples"):
        tasks.get("genre", k_shot=300)


def test_few_shot_is_balanced_deterministic_and_seeded():
    examples = [{"text": str(i), "label": i % 3} for i in range(60)]
    picks = {seed: few_shot(examples, 5, seed) for seed in SEEDS}
    for picked in picks.values():
        assert collections.Counter(e["label"] for e in picked) == {0: 5, 1: 5, 2: 5}
        assert len({e["text"] for e in picked}) == 15
    assert few_shot(examples, 5, 13) == picks[13]
    assert len({tuple(e["text"] for e in p) for p in picks.values()}) == len(SEEDS)
    assert len(few_shot(examples, 7, 0, key=None)) == 7


def test_few_shot_errors_name_the_class_and_counts():
    examples = [{"label": 0}] * 10 + [{"label": 1}] * 3
    with pytest.raises(ValueError, match=r"class 1 has only 3 examples; counts per class: 0: 10, 1: 3"):
        few_shot(examples, 4, 13)
    with pytest.raises(ValueError, match=r"class 2 \('c'\) has only 0 examples"):
        few_shot(examples, 2, 13, label_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="positive integer"):
        few_shot(examples, 0, 13)


def test_split_checks_and_synthetic_tasks_unchanged():
    synthetic = tasks.get("synthetic_sentiment", n_train=8, n_eval=4)
    assert synthetic.templates == (synthetic.template,) and synthetic.template.verbalizer == ("bad", "good")
    empty = tasks.Task("t", "classify", {"train": []}, num_classes=2)
    with pytest.raises(ValueError, match="is empty"):
        empty.split("train")
    with pytest.raises(ValueError, match="outside the label set 0..1"):
        tasks.Task("t", "classify", {"train": [{"text": "x", "label": 2}]}, num_classes=2).split("train")
    with pytest.raises(ValueError, match="lacks a string 'input' and 'output'"):
        tasks.Task("t", "generate", {"train": [{"input": "x"}]}).split("train")
    with pytest.raises(ValueError, match="3 verbalizer words for 2 classes"):
        tasks.Task("t", "classify", {}, num_classes=2, templates=(Template("{text}", (" a", " b", " c")),))
    with pytest.raises(ValueError, match="kind 'regress'"):
        tasks.Task("t", "regress", {})
