"""Tiny models with real tokenizers for the GGUF tests, one per family llama.cpp runs.

``tests/builders.py`` gives every family the same small WordPiece tokenizer; llama.cpp reads the
tokenizer from the file, so each family here gets the kind it ships with
(``tests/data/gguf_tokenizers``, made by ``tests/data/make_gguf_tokenizers.py``). Hidden sizes are 64
(Q8_0 blocks of 32 fit) and weights are drawn wider than transformers' default initialisation, so
different inputs give clearly different embeddings and scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

from builders import TOKENIZER_DIR, _unique_state_dict, _write_config

GGUF_TOKENIZERS = Path(__file__).resolve().parent / "data" / "gguf_tokenizers"
GGUF_FAMILIES = ("bert", "bert-reranker", "xlmr", "xlmr-reranker", "llama", "qwen2", "gemma2")
HIDDEN = 64
INIT_STD = 0.1
RERANKER_HEAD_SCALE = 5.0


def _vocab_size(tokenizer_dir: Path) -> int:
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    ids = list(vocab.values()) if isinstance(vocab, dict) else range(len(vocab))
    return max([*ids, *(t["id"] for t in tokenizer.get("added_tokens", []))]) + 1


def _encoder(**extra) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                initializer_range=INIT_STD, **extra)


def _decoder(vocab_size: int, **extra) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                initializer_range=INIT_STD, tie_word_embeddings=False, **extra)


def _make(family: str):
    """(model, tokenizer folder) for ``family``."""
    xlmr_dir = GGUF_TOKENIZERS / "xlmr"
    xlmr = _encoder(vocab_size=_vocab_size(xlmr_dir), max_position_embeddings=130, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
    bert = _encoder(vocab_size=_vocab_size(TOKENIZER_DIR), max_position_embeddings=128, type_vocab_size=2)
    if family == "bert":
        return BertModel(BertConfig(**bert)), TOKENIZER_DIR
    if family == "bert-reranker":
        return BertForSequenceClassification(BertConfig(**bert, num_labels=1)), TOKENIZER_DIR
    if family == "xlmr":
        return XLMRobertaModel(XLMRobertaConfig(**xlmr)), xlmr_dir
    if family == "xlmr-reranker":
        return XLMRobertaForSequenceClassification(XLMRobertaConfig(**xlmr, num_labels=1)), xlmr_dir
    if family == "llama":
        llama_dir = GGUF_TOKENIZERS / "llama"
        return LlamaForCausalLM(LlamaConfig(**_decoder(_vocab_size(llama_dir)), bos_token_id=1, eos_token_id=2)), llama_dir
    if family == "qwen2":
        qwen_dir = GGUF_TOKENIZERS / "qwen2"
        return Qwen2ForCausalLM(Qwen2Config(**_decoder(_vocab_size(qwen_dir)))), qwen_dir
    if family == "gemma2":
        llama_dir = GGUF_TOKENIZERS / "llama"
        config = Gemma2Config(**_decoder(_vocab_size(llama_dir)), head_dim=16, sliding_window=64,
                              query_pre_attn_scalar=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return Gemma2ForCausalLM(config), llama_dir
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(GGUF_FAMILIES)}")


def build_gguf_model(family: str, path: Path, *, seed: int, pooling: str | None = None) -> Path:
    """A tiny ``family`` model with its real tokenizer at ``path``; ``pooling`` (``mean``/``cls``) adds a
    sentence-transformers Pooling module.

    Example::

        build_gguf_model("xlmr", tmp / "m0", seed=0)
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, tokenizer_dir = _make(family)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * INIT_STD)
        if family.endswith("reranker"):
            # A tiny random encoder gives similar [CLS] states for every pair; a wider head spreads the
            # scores over more than the tests' tolerance, so their order means something.
            model.classifier.out_proj.weight.mul_(RERANKER_HEAD_SCALE) if hasattr(model.classifier, "out_proj") \
                else model.classifier.weight.mul_(RERANKER_HEAD_SCALE)
    model.eval()
    save_torch_state_dict(_unique_state_dict(model), path)
    _write_config(model.config, model, path, torch.float32)
    for file in tokenizer_dir.iterdir():
        shutil.copyfile(file, path / file.name)
    if pooling is not None:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": HIDDEN,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        }))
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]))
    return path
