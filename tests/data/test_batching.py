import numpy as np

from ptune.data import batching
from ptune.data.templates import Template
from ptune.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def test_classification_truncates_only_the_text():
    template = Template("T: {text} -> ", ("a", "b"))
    arrays = batching.encode([{"text": "x" * 100, "label": 1}, {"text": "yy", "label": 0}], "classify",
                             template, TOK, "gpt2", 16)
    row = arrays["input_ids"][0]
    assert TOK.decode(row) == "T: " + "x" * 8 + " -> " and arrays["attention_mask"][0].sum() == 16
    assert TOK.decode(arrays["input_ids"][1][arrays["attention_mask"][1] > 0]) == "T: yy -> "
    assert arrays["labels"].tolist() == [1, 0]


def test_generate_predicts_only_the_output_and_eos():
    arrays = batching.encode([{"input": "hi", "output": "yo"}], "generate", Template("Q: {text}\nA:"), TOK, "gpt2", 16)
    ids, mask = arrays["input_ids"][0], arrays["loss_mask"][0]
    assert TOK.decode(ids[arrays["attention_mask"][0] > 0]) == "Q: hi\nA:yo"
    assert ids[mask > 0].tolist() == TOK.encode("yo") + [TOK.eos_id]


def test_batch_order_depends_only_on_seed_and_step():
    arrays = {"x": np.arange(10)}
    a = [batching.batch_at(arrays, s, 4, seed=3)["x"].tolist() for s in range(5)]
    b = [batching.batch_at(arrays, s, 4, seed=3)["x"].tolist() for s in (3, 4, 0, 1, 2)]
    assert a[3:] + a[:3] == b
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))        # no repeats inside an epoch
    assert a != [batching.batch_at(arrays, s, 4, seed=4)["x"].tolist() for s in range(5)]
