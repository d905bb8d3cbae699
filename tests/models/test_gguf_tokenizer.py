"""ptune's torch-free GGUF tokenizer is the tokenizer transformers' own GGUF conversion builds."""

import functools
import itertools
import json

import gguf
import pytest

from ptune import assets
from ptune.models import gguf_tokenizer, pretrained

# Edge cases beside the Brown corpus: unicode, whitespace runs, digits, contractions, specials in text.
EDGE_CASES = ["", " ", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n\n", "ünïcödé café naïve",
              "日本語のテキスト 中文 한국어", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧", "numbers 1234567 3.14159 1,000,000",
              "it's don't we'll I'M", "<|im_start|>user\nhi<|im_end|>", "a<|endoftext|>b", "\u00a0nbsp\u2009thin",
              "tokens\x00with\x01control\x7fbytes", "ﬁ ligature Ⅸ roman"]
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy? Answer in one word."}]


def _write(path, tokens, token_types, model="gpt2", arch="llama", merges=None, scores=None, pre=None):
    """A GGUF file with tokenizer metadata and no tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_file(path, pre=None, specials=("<|endoftext|>", "<s>", "</s>")):
    """A tiny byte-level vocabulary: specials, the 256 byte characters, a few merges."""
    alphabet = list(gguf_tokenizer._bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "n d", "Ġa nd", "1 2", "12 3", "' s", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ"]
    tokens = [*specials, *alphabet, *(m.replace(" ", "") for m in merges), "<|im_start|>", "<think>"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials) - 2) + [3, 4]
    return _write(path, tokens, types, merges=merges, pre=pre)


def _reference(path):
    """transformers' own conversion (imports torch)."""
    pytest.importorskip("torch")
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same(ours, theirs, texts):
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_ids == theirs.all_special_ids and len(ours) == len(theirs)
    for text in texts:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids)


@functools.lru_cache
def _smollm2():
    """(file, ptune's tokenizer, transformers' conversion as ptune called it before issue 19)."""
    path = assets.ensure("smollm2")
    pytest.importorskip("torch")
    from transformers import AutoTokenizer
    return path, gguf_tokenizer.from_gguf(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _brown(per_genre=2):
    """The first whole documents (~12k characters each) of every genre of the Brown corpus."""
    with open(assets.ensure("brown_lm") / "train.jsonl") as f:
        docs = sorted((json.loads(line) for line in f), key=lambda doc: doc["genre"])
    return [doc["text"] for _, group in itertools.groupby(docs, lambda doc: doc["genre"])
            for doc in itertools.islice(group, per_genre)]


def test_smollm2_tokenizer_matches_transformers():
    path, ours, theirs = _smollm2()
    texts = _brown() + EDGE_CASES
    assert sum(map(len, texts)) > 250_000
    _assert_same(ours, theirs, texts)
    ids = (len(ours), ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id)
    assert ids == (49152, 1, 2, 2, 0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]
    assert ours.convert_tokens_to_ids(specials) == theirs.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 5, 16]
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder and len(ours.added_tokens_decoder) == 17


def test_smollm2_chat_template_matches_transformers():
    _, ours, theirs = _smollm2()
    assert ours.chat_template == theirs.chat_template
    text = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids == theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 4 and ours.decode(ids) == text


def test_load_tokenizer_caches_the_same_tokenizer(tmp_path):
    path, _, theirs = _smollm2()
    copy = tmp_path / path.name
    copy.symlink_to(path)
    tokenizer = pretrained.load_tokenizer(copy)
    assert (tmp_path / (path.name + ".tokenizer") / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".tokenizer"]   # no temp dir left
    _assert_same(tokenizer.tokenizer, theirs, EDGE_CASES)
    assert tokenizer.tokenizer.chat_template == theirs.chat_template
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (49152, 2, 2)


def test_pre_tokenizer_splits_are_transformers():
    pytest.importorskip("torch")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    assert gguf_tokenizer.PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


@pytest.mark.parametrize("pre", [None, "smollm", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"])
def test_byte_level_matches_transformers(tmp_path, pre):
    path = _byte_level_file(tmp_path / "tiny.gguf", pre)
    _assert_same(gguf_tokenizer.from_gguf(path), _reference(path), EDGE_CASES + ["the and 123's   x\n\n"])


@pytest.mark.parametrize("merges", [False, True])
def test_sentencepiece_matches_transformers(tmp_path, merges):
    """Llama-2-style: <unk> <s> </s>, 256 byte tokens, then pieces; merges given or implied by scores."""
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "c", "é", "▁t", "he", "▁the", "▁a", "nd", "▁and", "▁c", "at", "▁cat"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_start|>", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    merge_list = ["▁ t", "h e", "▁t he", "▁ a", "n d", "▁a nd", "▁ c", "a t", "▁c at"] if merges else None
    path = _write(tmp_path / "sp.gguf", tokens, types, model="llama", scores=scores, merges=merge_list)
    ours = gguf_tokenizer.from_gguf(path)
    _assert_same(ours, _reference(path), EDGE_CASES + ["the cat and the hat", "<s>the</s>"])
    assert ours("the cat").input_ids == [1, tokens.index("▁the"), tokens.index("▁cat")]


def test_byte_level_vocabulary_is_not_extended(tmp_path):
    """transformers appends <|endoftext|> when the vocabulary lacks it (past the model's embeddings); ptune does not."""
    path = _byte_level_file(tmp_path / "tiny.gguf", specials=("<pad>", "<s>", "</s>"))
    ours = gguf_tokenizer.from_gguf(path)
    assert len(ours) == len(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents())
    assert ours(" the and").input_ids == ours.convert_tokens_to_ids(["Ġthe", "Ġand"])


@pytest.mark.parametrize("model, arch", [("bert", "llama"), ("t5", "llama"), ("llama", "gemma")])
def test_unsupported_tokenizer_model_is_refused(tmp_path, model, arch):
    path = _write(tmp_path / "other.gguf", ["<unk>", "<s>", "</s>", "a"], [2, 3, 3, 1], model=model, arch=arch)
    with pytest.raises(ValueError, match=rf"other\.gguf: GGUF tokenizer model '{model}' \(tokenizer\.ggml\.model\) "
                                         rf"of architecture '{arch}' is not supported; ptune builds 'gpt2' "
                                         rf"\(byte-level BPE\) and 'llama' \(SentencePiece BPE; not for gemma"):
        gguf_tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match="not supported"):
        pretrained.load_tokenizer(path)
    assert [p.name for p in tmp_path.iterdir()] == ["other.gguf"]   # nothing half-built left behind


def test_bad_files_are_refused(tmp_path):
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
        gguf_tokenizer.from_gguf(not_gguf)
    bad_id = _write(tmp_path / "bad.gguf", ["<|endoftext|>", "a"], [3, 1], merges=[])
    with pytest.raises(ValueError, match=r"bad\.gguf: tokenizer\.ggml\.eos_token_id=2 is outside the vocabulary of 2"):
        gguf_tokenizer.from_gguf(bad_id)
