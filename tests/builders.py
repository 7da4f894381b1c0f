"""Tiny model folders for tests: offline, deterministic, a few hundred kB each.

Every family builds a complete folder (``config.json``, weights, tokenizer files copied
from ``tests/data/tokenizer``) with random weights drawn after ``torch.manual_seed(seed)``;
two seeds give a "base" and a "fine-tuned" model of the same architecture, and every
floating-point tensor differs between them.

Weights are written with ``huggingface_hub.save_torch_state_dict`` rather than
``save_pretrained``: transformers 5 ignores ``safe_serialization=False``, and writing the
state dict ourselves gives the same files on both stacks.

Example::

    from builders import build_model  # tests/ is on sys.path under pytest
    base = build_model("bert-encoder", tmp / "base", seed=0, pooling="mean")
    tuned = build_model("bert-encoder", tmp / "tuned", seed=1, pooling="mean")
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
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "tokenizer"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Facts about the committed tokenizer (see tests/data/make_tokenizer.py).
VOCAB_SIZE = len((TOKENIZER_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines())
MODEL_MAX_LENGTH = 128
PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 1, 2, 3

HIDDEN = 32
FAMILIES = ("bert-encoder", "bert-reranker", "xlmr-reranker", "xlmr-m3", "llama-decoder")
WEIGHTS_FORMATS = ("safetensors", "bin")
POOLINGS = ("mean", "cls")
POOLING_FAMILIES = ("bert-encoder", "xlmr-m3")

# Spread added to every floating-point tensor, so that LayerNorm weights and biases
# (initialised to constants by transformers) also differ between seeds.
NOISE_STD = 0.02

_BERT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=MODEL_MAX_LENGTH,
    pad_token_id=PAD_ID,
)
# XLM-R numbers positions from pad_token_id + 1, so it needs room for
# model_max_length + pad_token_id + 1 positions (real XLM-R: 512 + 2 = 514).
# type_vocab_size=2 because the BERT tokenizer emits token_type_ids 1 for the second text of a pair.
_XLMR = dict(
    _BERT,
    max_position_embeddings=MODEL_MAX_LENGTH + PAD_ID + 2,
    type_vocab_size=2,
    bos_token_id=CLS_ID,
    eos_token_id=SEP_ID,
)
_LLAMA = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=MODEL_MAX_LENGTH,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=CLS_ID,
    eos_token_id=SEP_ID,
)


def _make_model(family: str) -> PreTrainedModel:
    if family == "bert-encoder":
        return BertModel(BertConfig(**_BERT))
    if family == "bert-reranker":
        return BertForSequenceClassification(BertConfig(**_BERT, num_labels=1))
    if family == "xlmr-reranker":
        return XLMRobertaForSequenceClassification(XLMRobertaConfig(**_XLMR, num_labels=1))
    if family == "xlmr-m3":
        return XLMRobertaModel(XLMRobertaConfig(**_XLMR))
    if family == "llama-decoder":
        return LlamaForCausalLM(LlamaConfig(**_LLAMA))
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def _unique_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """State dict with each storage once, keeping the first name (as save_pretrained does:
    a tied ``lm_head.weight`` is dropped, ``model.embed_tokens.weight`` kept)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        unique[name] = tensor.detach().contiguous()
    return unique


def _write_config(config: PretrainedConfig, model: PreTrainedModel, path: Path, dtype: torch.dtype) -> None:
    # Both stacks write the field as "dtype", and transformers 4.57 reads it back as torch_dtype.
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)


def _write_sentence_transformers(path: Path, pooling: str) -> None:
    """The sentence-transformers <=5.3 layout, which 5.3 and 6.x both read."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if pooling == "cls":
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (path / "1_Pooling").mkdir(exist_ok=True)
    _write_json(path / "1_Pooling" / "config.json", pooling_config)
    _write_json(path / "modules.json", modules)
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": MODEL_MAX_LENGTH, "do_lower_case": False})
    _write_json(
        path / "config_sentence_transformers.json",
        {"__version__": {"sentence_transformers": "5.3.0"}, "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _add_noise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * NOISE_STD)


def build_model(
    family: str,
    path: Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    weights_format: str = "safetensors",
    pooling: str | None = None,
    max_shard_size: str | None = None,
    prefix: bool = False,
) -> Path:
    """Build a tiny random model folder of ``family`` at ``path`` and return ``path``.

    Args:
        family: one of ``FAMILIES``:
            ``bert-encoder`` (BertModel), ``bert-reranker`` / ``xlmr-reranker``
            (``*ForSequenceClassification``, one label), ``xlmr-m3`` (XLMRobertaModel plus
            bge-m3's ``colbert_linear.pt`` and ``sparse_linear.pt``), ``llama-decoder``
            (LlamaForCausalLM with tied embeddings, plus ``generation_config.json``).
        path: folder to create (may exist).
        seed: seed for ``torch.manual_seed``; same seed, same tensors.
        dtype: dtype of the saved weights (and of ``config.json``'s ``dtype``).
        weights_format: ``"safetensors"`` (``model.safetensors``) or ``"bin"`` (``pytorch_model.bin``).
        pooling: ``"mean"`` or ``"cls"`` to also write a sentence-transformers layout
            (``cls`` adds a Normalize module); encoder families only.
        max_shard_size: e.g. ``"20KB"`` to write shards plus an index file.
        prefix: store the ``bert-encoder`` weights under ``bert.`` keys, as a
            BertForMaskedLM-style checkpoint does; AutoModel strips the prefix on load.

    Example::

        build_model("llama-decoder", tmp / "m", seed=1, dtype=torch.bfloat16, weights_format="bin")
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"unknown weights_format {weights_format!r}; expected one of {', '.join(WEIGHTS_FORMATS)}")
    if pooling is not None and (pooling not in POOLINGS or family not in POOLING_FAMILIES):
        raise ValueError(f"pooling {pooling!r} needs one of {POOLINGS} and a family in {POOLING_FAMILIES}")
    if prefix and family != "bert-encoder":
        raise ValueError("prefix=True is only meaningful for family 'bert-encoder'")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _make_model(family)
    _add_noise(model)
    model.to(dtype).eval()

    state_dict = _unique_state_dict(model)
    if prefix:
        state_dict = {f"bert.{name}": tensor for name, tensor in state_dict.items()}
    save_torch_state_dict(
        state_dict,
        path,
        safe_serialization=weights_format == "safetensors",
        **({"max_shard_size": max_shard_size} if max_shard_size else {}),
    )
    _write_config(model.config, model, path, dtype)

    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, path / name)

    if family == "llama-decoder":
        GenerationConfig(bos_token_id=CLS_ID, eos_token_id=SEP_ID, pad_token_id=PAD_ID).save_pretrained(path)
    if family == "xlmr-m3":
        # FlagEmbedding 1.4.2 (finetune/embedder/encoder_only/m3/runner.py, get_model) loads these with
        # torch.load(weights_only=True) into Linear(hidden, hidden) and Linear(hidden, 1); when either
        # file is missing it initialises both heads randomly.
        colbert = torch.nn.Linear(HIDDEN, HIDDEN).to(dtype)
        sparse = torch.nn.Linear(HIDDEN, 1).to(dtype)
        torch.save(colbert.state_dict(), path / "colbert_linear.pt")
        torch.save(sparse.state_dict(), path / "sparse_linear.pt")
    if pooling is not None:
        _write_sentence_transformers(path, pooling)
    return path
