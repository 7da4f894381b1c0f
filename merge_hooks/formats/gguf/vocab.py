"""Export a Hugging Face tokenizer as the GGUF ``tokenizer.ggml.*`` keys llama.cpp reads.

The source is the model folder's ``tokenizer.json`` (what every fast tokenizer saves). Four kinds,
chosen from its model type and pre-tokenizer (see ``src/llama-vocab.cpp`` for what llama.cpp does
with each):

- WordPiece -> llama.cpp's ``bert`` (WPM) tokenizer: ``##x`` becomes ``x``, other non-special tokens get
  the U+2581 word-start mark; the BertNormalizer's lowercase / strip-accents flags are written.
- Unigram (XLM-R) -> ``t5`` (UGM): pieces and scores in the file's (fairseq) order, the precompiled
  charsmap, space-prefix and whitespace flags; the UGM defaults (no BOS, EOS id 1) are wrong for
  XLM-R, so every special id and add-bos/eos flag is written explicitly.
- byte-level BPE -> ``gpt2`` with merges and the pre-tokenizer llama.cpp knows by name.
- SentencePiece-style BPE (byte fallback, Llama / Mistral / Gemma) -> ``llama`` (SPM), through gguf-py's
  ``LlamaHfVocab``.

Special token ids and add-bos/eos/sep flags come from gguf-py's ``SpecialVocab``, which reads the
same files. No helper for WordPiece or XLM-R's unigram exists in gguf-py, hence the code here.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...errors import MergeHooksError

WORD_START = "\u2581"

# llama.cpp's token types (gguf-py TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Byte-level BPE split patterns as tokenizer.json writes them -> llama.cpp's pre-tokenizer name
# (src/llama-vocab.cpp keeps the same patterns, rewritten without (?i:)).
_BPE_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class Vocab:
    """Everything written under ``tokenizer.ggml.*``."""

    model: str
    pre: str
    tokens: list[Any]
    types: list[int]
    scores: Optional[list[float]] = None
    merges: bool = False
    flags: dict[str, bool] = field(default_factory=dict)
    charsmap: Optional[bytes] = None
    token_type_count: Optional[int] = None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _steps(node: Optional[dict]) -> list[dict]:
    """A normalizer or pre-tokenizer flattened: a ``Sequence`` gives its parts."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        return [step for part in node.get(key, []) for step in _steps(part)]
    return [node]


def _added(tokenizer: dict) -> dict[int, dict]:
    return {t["id"]: t for t in tokenizer.get("added_tokens", [])}


def _padded(tokens: list, types: list[int], scores: Optional[list[float]], vocab_size: int):
    """llama.cpp needs one token per embedding row; rows past the tokenizer are unused."""
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-10000.0)


def _by_id(vocab: dict[str, int], added: dict[int, dict], n: int) -> list[Optional[str]]:
    tokens: list[Optional[str]] = [None] * n
    for token, i in vocab.items():
        tokens[i] = token
    for i, token in added.items():
        tokens[i] = token["content"]
    return tokens


def _wordpiece(tokenizer: dict, vocab_size: int) -> Vocab:
    model = tokenizer["model"]
    added = _added(tokenizer)
    n = max(vocab_size, max(model["vocab"].values()) + 1, max(added, default=-1) + 1)
    tokens, types = [], []
    prefix = model.get("continuing_subword_prefix", "##")
    for i, token in enumerate(_by_id(model["vocab"], added, n)):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added and added[i].get("special"):
            tokens.append(token)
            types.append(CONTROL)
        else:
            tokens.append(token[len(prefix):] if token.startswith(prefix) else WORD_START + token)
            types.append(NORMAL)
    flags = {}
    for step in _steps(tokenizer.get("normalizer")):
        if step.get("type") == "BertNormalizer":
            lowercase = bool(step.get("lowercase", True))
            strip = step.get("strip_accents")
            flags["tokenizer.ggml.normalizer.lowercase"] = lowercase
            flags["tokenizer.ggml.normalizer.strip_accents"] = lowercase if strip is None else bool(strip)
    return Vocab("bert", "default", tokens, types, flags=flags)


def _unigram(tokenizer: dict, vocab_size: int) -> Vocab:
    model = tokenizer["model"]
    added = _added(tokenizer)
    pieces = model["vocab"]
    n = max(vocab_size, len(pieces), max(added, default=-1) + 1)
    tokens: list[Any] = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i, (piece, score) in enumerate(pieces):
        tokens[i], scores[i], types[i] = piece, float(score), NORMAL
    for i, token in added.items():
        tokens[i], scores[i] = token["content"], 0.0
        types[i] = CONTROL if token.get("special") else USER_DEFINED
    if model.get("unk_id") is not None:
        types[model["unk_id"]] = UNKNOWN

    charsmap = None
    remove_extra_whitespaces = False
    for step in _steps(tokenizer.get("normalizer")):
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            charsmap = base64.b64decode(step["precompiled_charsmap"])
        if step.get("type") == "Replace" and step.get("pattern", {}).get("Regex") == " {2,}":
            remove_extra_whitespaces = True
    add_space_prefix = any(
        step.get("type") == "Metaspace" and (step.get("prepend_scheme", "always") != "never")
        and step.get("add_prefix_space", True)
        for step in _steps(tokenizer.get("pre_tokenizer"))
    )
    flags = {
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.ggml.remove_extra_whitespaces": remove_extra_whitespaces,
    }
    return Vocab("t5", "default", tokens, types, scores=scores, flags=flags, charsmap=charsmap)


def _byte_level_bpe(tokenizer: dict, vocab_size: int, path: Path) -> Vocab:
    steps = _steps(tokenizer.get("pre_tokenizer"))
    pre = None
    for step in steps:
        if step.get("type") == "Split":
            pre = _BPE_PRE.get(step.get("pattern", {}).get("Regex"))
            break
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            pre = "gpt-2"
            break
    if pre is None:
        raise MergeHooksError(
            f"cannot export the tokenizer in {path} to GGUF: its byte-level BPE pre-tokenizer is not one llama.cpp "
            f"knows (supported: GPT-2, Llama 3, Qwen2 split patterns)"
        )
    added = _added(tokenizer)
    vocab = tokenizer["model"]["vocab"]
    n = max(vocab_size, max(vocab.values()) + 1, max(added, default=-1) + 1)
    tokens, types = [], []
    for i, token in enumerate(_by_id(vocab, added, n)):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL)
    return Vocab("gpt2", pre, tokens, types, merges=True)


def _sentencepiece_bpe(model_dir: Path, vocab_size: int) -> Vocab:
    from gguf import LlamaHfVocab

    hf = LlamaHfVocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, token_type in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(token_type))
    _padded(tokens, types, scores, vocab_size)
    return Vocab("llama", "default", tokens, types, scores=scores)


def export_vocab(model_dir: Path, *, vocab_size: int, token_type_count: Optional[int] = None) -> Vocab:
    """Read ``model_dir/tokenizer.json`` into the GGUF vocabulary llama.cpp needs.

    Raises:
        MergeHooksError: there is no ``tokenizer.json`` or its kind has no llama.cpp counterpart.

    Example:
        >>> export_vocab(Path("bge-small-en-v1.5"), vocab_size=30522).model
        'bert'
    """
    path = Path(model_dir) / "tokenizer.json"
    tokenizer = _read_json(path)
    if not tokenizer:
        raise MergeHooksError(
            f"cannot export the tokenizer of {model_dir} to GGUF: it has no tokenizer.json (save the tokenizer "
            "with a fast tokenizer's save_pretrained to write one)"
        )
    kind = tokenizer.get("model", {}).get("type")
    if kind == "WordPiece":
        vocab = _wordpiece(tokenizer, vocab_size)
    elif kind == "Unigram":
        vocab = _unigram(tokenizer, vocab_size)
    elif kind == "BPE" and tokenizer["model"].get("byte_fallback"):
        vocab = _sentencepiece_bpe(Path(model_dir), vocab_size)
    elif kind == "BPE":
        vocab = _byte_level_bpe(tokenizer, vocab_size, path)
    else:
        raise MergeHooksError(
            f"cannot export the tokenizer in {path} to GGUF: llama.cpp has no tokenizer for model type {kind!r} "
            "(supported: WordPiece, Unigram, BPE)"
        )
    if len(vocab.tokens) != vocab_size:
        raise MergeHooksError(
            f"cannot export the tokenizer in {path} to GGUF: it has {len(vocab.tokens)} tokens but the model's "
            f"embedding has {vocab_size} rows"
        )
    vocab.token_type_count = token_type_count
    return vocab


def add_vocab(writer, vocab: Vocab, model_dir: Path) -> None:
    """Write ``vocab`` and the special token ids / add-bos-eos-sep flags into a ``gguf.GGUFWriter``."""
    from gguf import SpecialVocab

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.charsmap:
        writer.add_precompiled_charsmap(vocab.charsmap)
    if vocab.token_type_count is not None:
        writer.add_token_type_count(vocab.token_type_count)
    for key, value in vocab.flags.items():
        # gguf 0.19 has no add_* helper for the BertNormalizer keys: written by their literal names.
        writer.add_bool(key, value)
    SpecialVocab(model_dir, load_merges=vocab.merges, n_vocab=len(vocab.tokens)).add_to_gguf(writer, quiet=True)
