"""A GGUF file's tokenizer as a transformers tokenizer, without torch.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges, token types, special
token ids and chat template as metadata. transformers' own GGUF conversion imports torch, so
this reads the metadata with the `gguf` package and builds the same `tokenizers.Tokenizer`
that transformers 5.25 builds (integrations/gguf/gguf_tokenizer_mapping.py), wrapped the same
way. tests/models/test_gguf_tokenizer.py holds the two to identical output.

    tokenizer = from_gguf("model.gguf")          # a transformers PreTrainedTokenizerFast

Supported `tokenizer.ggml.model`s: "gpt2" (byte-level BPE: GPT-2, SmolLM2, Llama 3, ...) and
"llama" (SentencePiece BPE with byte fallback: Llama 2, Mistral, TinyLlama, ...).
"""

from __future__ import annotations

from ptune.errors import UserError

SUPPORTED = ("gpt2", "llama")
# These architectures' "llama" (SentencePiece) vocabularies need fixes transformers applies
# and this module does not.
_OTHER_SENTENCEPIECE = ("gemma", "gemma2", "gemma3", "phi3")
_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp's token types
# The default special tokens of transformers' GPT2Tokenizer / LlamaTokenizer, which its GGUF
# conversion builds on; they become special tokens. transformers appends one that the vocabulary
# lacks as a new id, past the model's embedding table; here only those present are marked.
_DEFAULT_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<unk>", "<s>", "</s>")}

# How text is split before byte-level BPE, by `tokenizer.ggml.pre`, as in transformers 5.25
# (GGUF_PRE_TOKENIZER_SPLITS); any other value keeps GPT-2's split.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35, "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


def read_metadata(path) -> dict:
    """The `tokenizer.*` metadata of a GGUF file, keys without the `tokenizer.` / `ggml.` prefix,
    plus `architecture`."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:   # gguf raises bare ValueErrors/struct errors on truncated or foreign files
        raise UserError(f"{path}: not a readable GGUF file ({e}); re-download or re-export it") from None
    meta = {key.removeprefix("tokenizer.").removeprefix("ggml."): field.contents()
            for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    arch = reader.fields.get("general.architecture")
    meta["architecture"] = arch.contents() if arch is not None else None
    return meta


def from_gguf(path):
    """The transformers tokenizer (`PreTrainedTokenizerFast`) described by a GGUF file's metadata."""
    from transformers import PreTrainedTokenizerFast
    meta = read_metadata(path)
    kind = meta.get("model")
    if kind not in SUPPORTED or (kind == "llama" and meta["architecture"] in _OTHER_SENTENCEPIECE):
        raise UserError(f"{path}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) of architecture "
                        f"{meta['architecture']!r} is not supported; ptune builds 'gpt2' (byte-level BPE) and "
                        f"'llama' (SentencePiece BPE; not for {', '.join(_OTHER_SENTENCEPIECE)}) tokenizers")
    if "tokens" not in meta:
        raise UserError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens; the file carries no tokenizer")
    tokens = meta["tokens"]
    kwargs = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise UserError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary of "
                            f"{len(tokens)} tokens; fix the file's metadata")
        kwargs[name] = tokens[token_id] if token_id is not None else None
    if kind == "llama":   # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        meta.setdefault("add_bos_token", True)
    kwargs.update({key: meta[key] for key in ("add_bos_token", "add_eos_token", "chat_template") if key in meta})
    backend = _byte_level(meta, path) if kind == "gpt2" else _sentencepiece(meta)
    _add_special_tokens(backend, kind, tokens, meta.get("token_type") or ())
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _byte_level(meta: dict, path):
    """GPT-2-style byte-level BPE; tokens the file spells in plain UTF-8 are respelled in the
    byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    if "merges" not in meta:
        raise UserError(f"{path}: byte-level GGUF tokenizer without tokenizer.ggml.merges; re-export the file "
                        f"with its merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(meta["tokens"])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta), dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: dict):
    """SentencePiece BPE with byte fallback: "▁" for spaces, one prepended to the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {token: index for index, token in enumerate(meta["tokens"])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, vocab), fuse_unk=True, byte_fallback=True,
                                     dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    return tokenizer


def _merges(meta: dict, vocab: dict | None = None) -> list[tuple[str, str]]:
    """The file's merges or, without them (older SentencePiece files), the ones its scores imply:
    every split of a token into two vocabulary tokens, best-scored token first (transformers'
    `generate_merges`)."""
    if "merges" in meta:
        return [tuple(merge.split(" ")) for merge in meta["merges"]]
    ranked = []
    for token, score in dict(zip(meta["tokens"], meta["scores"])).items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        ranked += sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))
    ranked.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_special_tokens(tokenizer, kind: str, tokens: list[str], token_types) -> None:
    """Control tokens (`<|im_start|>`) become special tokens, user-defined ones (`<think>`) plain
    added tokens, so that text containing them is never split into pieces. In a byte-level
    vocabulary a control token outside the byte alphabet is a llama.cpp mislabel: skipped."""
    from tokenizers import AddedToken
    vocab = tokenizer.get_vocab()
    alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    defaults = [t for t in _DEFAULT_SPECIALS[kind] if t in vocab]
    control = [t for t, kind_ in zip(tokens, token_types)
               if kind_ == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in defaults + control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind_ in zip(tokens, token_types) if kind_ == _USER_DEFINED and t in vocab])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes stand for themselves, the rest
    map to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table
