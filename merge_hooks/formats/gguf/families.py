"""What llama.cpp expects of each supported model family, as tables.

Each :class:`Family` says which Hugging Face architectures it covers, the llama.cpp architecture it
becomes, how every Hugging Face tensor name maps to a GGUF name (with an optional transform), which
tensors stay F32, which metadata keys are written and from which ``config.json`` keys.

The tables can be checked line by line against llama.cpp (vendored in llama-cpp-python 0.3.36):
``conversion/bert.py`` (``BertModel``, ``XLMRobertaModel``), ``conversion/llama.py``,
``conversion/qwen.py``, ``conversion/gemma.py`` and ``src/models/*.cpp`` (the tensors each
architecture loads). ``tests/test_gguf.py`` also checks every name against gguf-py's ``TensorNameMap``.

Nothing here imports gguf or numpy at import time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ...errors import MergeHooksError

# llama.cpp's pooling types (include/llama.h, enum llama_pooling_type).
POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 1, 2, 3, 4


@dataclass(frozen=True)
class Transform:
    """A change llama.cpp needs in a tensor, made on its row blocks as they stream past.

    In this order: ``skip(config)`` leading rows are dropped; ``reorder(rows, group)`` reorders rows
    within each run of ``group(shape, config)`` rows (the writer hands it whole runs: a head); ``values``
    maps float32 values elementwise. :meth:`shape` gives the written shape (declared before the data
    exists) and :meth:`apply` does all of it to a whole tensor.
    """

    name: str
    skip: Callable[[dict], int] = lambda config: 0
    group: Optional[Callable[[tuple[int, ...], dict], int]] = None
    reorder: Optional[Callable[[Any, int], Any]] = None
    values: Optional[Callable[[Any], Any]] = None

    def shape(self, shape: tuple[int, ...], config: dict) -> tuple[int, ...]:
        skip = self.skip(config)
        return (shape[0] - skip, *shape[1:]) if skip else tuple(shape)

    def apply(self, array, config: dict):
        """The written values of a whole tensor (float32 when ``values`` is set).

        Example:
            >>> PERMUTE_K.apply(k_proj, config)  # rows of each key head interleaved for llama.cpp's rope
        """
        shape = array.shape
        array = array[self.skip(config):]
        if self.reorder is not None:
            array = self.reorder(array, self.group(shape, config))
        return self.values(array) if self.values is not None else array


def _position_offset(config: dict) -> int:
    # XLM-R numbers positions from pad_token_id + 1; llama.cpp numbers them from 0.
    return config.get("pad_token_id", 1) + 1


def _rope_permute(rows, head_rows: int):
    """Hugging Face stores Q/K rows as two halves per head; llama.cpp's rope wants them interleaved
    (``LlamaModel.permute`` in llama.cpp's converter, on any whole number of heads)."""
    return rows.reshape(-1, 2, head_rows // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _head_rows(heads: Callable[[dict], int]) -> Callable[[tuple[int, ...], dict], int]:
    return lambda shape, config: shape[0] // heads(config)


CUT_POSITIONS = Transform("cut the first pad_token_id + 1 position rows", skip=_position_offset)
PERMUTE_Q = Transform("permute Q rows for rope", group=_head_rows(lambda c: c["num_attention_heads"]),
                      reorder=_rope_permute)
PERMUTE_K = Transform(
    "permute K rows for rope",
    group=_head_rows(lambda c: c.get("num_key_value_heads") or c["num_attention_heads"]),
    reorder=_rope_permute,
)
PLUS_ONE = Transform("add 1 (Gemma stores norm weights minus 1)", values=lambda a: a + 1)


@dataclass(frozen=True)
class Rule:
    """One Hugging Face module pattern (``{bid}`` matches the block number) and its GGUF name;
    the ``.weight`` / ``.bias`` suffix is carried over."""

    hf: str
    gguf: str
    transform: Optional[Transform] = None


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    arch: str
    rules: tuple[Rule, ...]
    #: Prefixes stripped before matching (task heads wrap the encoder as ``bert.`` / ``roberta.``).
    prefixes: tuple[str, ...] = ()
    #: Hugging Face modules llama.cpp has no use for (patterns like ``rules``).
    drop: tuple[str, ...] = ()
    #: GGUF tensors kept F32 whatever the file type (besides every 1-D tensor).
    f32: tuple[str, ...] = ()
    #: ``{arch}.<key>`` -> ``config.json`` key, or a callable of the config, or a constant.
    params: tuple[tuple[str, Any], ...] = ()
    #: The pooling written when no sentence-transformers Pooling module says otherwise.
    pooling: int = POOLING_CLS
    decoder: bool = False
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def _patterns(self) -> list[tuple[re.Pattern, Optional[Rule]]]:
        if not self._compiled:
            def compile_(pattern: str, suffix: str) -> re.Pattern:
                return re.compile(re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)") + suffix)

            self._compiled.extend((compile_(r.hf, r"\.(?P<suffix>weight|bias)"), r) for r in self.rules)
            # Dropped names may be buffers without a suffix (embeddings.position_ids).
            self._compiled.extend((compile_(d, r"(\.weight|\.bias)?"), None) for d in self.drop)
        return self._compiled

    def map_name(self, name: str) -> tuple[Optional[str], Optional[Transform]]:
        """``(gguf name, transform)`` for a Hugging Face tensor name, ``(None, None)`` for a dropped one.

        Raises:
            KeyError: the name matches no rule.

        Example:
            >>> BERT.map_name("encoder.layer.3.attention.self.query.weight")
            ('blk.3.attn_q.weight', None)
        """
        for prefix in self.prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        for pattern, rule in self._patterns():
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if rule is None:
                return None, None
            gguf_name = rule.gguf.format(bid=match.groupdict().get("bid")) + "." + match["suffix"]
            return gguf_name, rule.transform
        raise KeyError(name)


_BERT_BLOCK = (
    Rule("encoder.layer.{bid}.attention.self.query", "blk.{bid}.attn_q"),
    Rule("encoder.layer.{bid}.attention.self.key", "blk.{bid}.attn_k"),
    Rule("encoder.layer.{bid}.attention.self.value", "blk.{bid}.attn_v"),
    Rule("encoder.layer.{bid}.attention.output.dense", "blk.{bid}.attn_output"),
    Rule("encoder.layer.{bid}.attention.output.LayerNorm", "blk.{bid}.attn_output_norm"),
    Rule("encoder.layer.{bid}.intermediate.dense", "blk.{bid}.ffn_up"),
    Rule("encoder.layer.{bid}.output.dense", "blk.{bid}.ffn_down"),
    Rule("encoder.layer.{bid}.output.LayerNorm", "blk.{bid}.layer_output_norm"),
)
_BERT_EMBEDDINGS = (
    Rule("embeddings.word_embeddings", "token_embd"),
    Rule("embeddings.token_type_embeddings", "token_types"),
    Rule("embeddings.LayerNorm", "token_embd_norm"),
)
# llama.cpp's bert graph has no pooler and no masked-LM head.
_BERT_DROP = ("pooler.dense", "embeddings.position_ids", "lm_head.dense", "lm_head.layer_norm", "lm_head.decoder",
              "lm_head", "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
              "cls.predictions.decoder", "cls.predictions")
_ENCODER_PARAMS = (
    ("embedding_length", "hidden_size"),
    ("feed_forward_length", "intermediate_size"),
    ("block_count", "num_hidden_layers"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.layer_norm_epsilon", "layer_norm_eps"),
    ("attention.causal", False),
)

BERT = Family(
    name="BERT encoder",
    architectures=("BertModel", "BertForMaskedLM"),
    arch="bert",
    prefixes=("bert.",),
    rules=(*_BERT_EMBEDDINGS, Rule("embeddings.position_embeddings", "position_embd"), *_BERT_BLOCK),
    drop=_BERT_DROP,
    f32=("position_embd.weight", "token_types.weight"),
    params=(("context_length", "max_position_embeddings"), *_ENCODER_PARAMS),
)

_XLMR_RULES = (
    *_BERT_EMBEDDINGS,
    Rule("embeddings.position_embeddings", "position_embd", CUT_POSITIONS),
    *_BERT_BLOCK,
)
_XLMR_PARAMS = (
    ("context_length", lambda c: c["max_position_embeddings"] - _position_offset(c)),
    *_ENCODER_PARAMS,
)

XLMR = Family(
    name="XLM-RoBERTa encoder",
    architectures=("XLMRobertaModel", "XLMRobertaForMaskedLM"),
    arch="bert",
    prefixes=("roberta.",),
    rules=_XLMR_RULES,
    drop=_BERT_DROP,
    f32=BERT.f32,
    params=_XLMR_PARAMS,
)

# RobertaClassificationHead: dense -> tanh -> out_proj on the <s> token, which is llama.cpp's rank
# pooling with ``cls`` and ``cls.output`` (llama-graph.cpp, LLAMA_POOLING_TYPE_RANK).
XLMR_RERANKER = Family(
    name="XLM-RoBERTa reranker",
    architectures=("XLMRobertaForSequenceClassification",),
    arch="bert",
    prefixes=("roberta.",),
    rules=(*_XLMR_RULES, Rule("classifier.dense", "cls"), Rule("classifier.out_proj", "cls.output")),
    drop=_BERT_DROP,
    f32=BERT.f32,
    params=_XLMR_PARAMS,
    pooling=POOLING_RANK,
)

_LLAMA_BLOCK = (
    Rule("embed_tokens", "token_embd"),
    Rule("norm", "output_norm"),
    Rule("lm_head", "output"),
    Rule("layers.{bid}.self_attn.v_proj", "blk.{bid}.attn_v"),
    Rule("layers.{bid}.self_attn.o_proj", "blk.{bid}.attn_output"),
    Rule("layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate"),
    Rule("layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up"),
    Rule("layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
    Rule("layers.{bid}.input_layernorm", "blk.{bid}.attn_norm"),
)
# Causal-LM checkpoints hold the decoder under "model."; embedders saved as the bare model do not.
_DECODER_PREFIXES = ("model.",)
_DECODER_PARAMS = (
    ("context_length", "max_position_embeddings"),
    ("embedding_length", "hidden_size"),
    ("feed_forward_length", "intermediate_size"),
    ("block_count", "num_hidden_layers"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", lambda c: c.get("num_key_value_heads") or c["num_attention_heads"]),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", lambda c: float(c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))),
    ("rope.dimension_count", lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]),
    ("vocab_size", "vocab_size"),
)
LLAMA = Family(
    prefixes=_DECODER_PREFIXES,
    name="Llama / Mistral decoder",
    architectures=("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "MistralModel"),
    arch="llama",
    rules=(
        *_LLAMA_BLOCK,
        Rule("layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q", PERMUTE_Q),
        Rule("layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k", PERMUTE_K),
        Rule("layers.{bid}.post_attention_layernorm", "blk.{bid}.ffn_norm"),
    ),
    drop=("layers.{bid}.self_attn.rotary_emb.inv_freq",),
    params=_DECODER_PARAMS,
    pooling=POOLING_LAST,
    decoder=True,
)

# Qwen2's rope rotates halves, as Hugging Face stores them: no permutation (llama.cpp uses NEOX rope).
QWEN2 = Family(
    prefixes=_DECODER_PREFIXES,
    name="Qwen2 decoder",
    architectures=("Qwen2ForCausalLM", "Qwen2Model"),
    arch="qwen2",
    rules=(
        *_LLAMA_BLOCK,
        Rule("layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q"),
        Rule("layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k"),
        Rule("layers.{bid}.post_attention_layernorm", "blk.{bid}.ffn_norm"),
    ),
    drop=LLAMA.drop,
    params=_DECODER_PARAMS,
    pooling=POOLING_LAST,
    decoder=True,
)

# Gemma2 keeps norm weights as (w - 1) and adds 1 at run time; llama.cpp wants w. Its lm_head is tied.
GEMMA2 = Family(
    prefixes=_DECODER_PREFIXES,
    name="Gemma2 decoder",
    architectures=("Gemma2ForCausalLM", "Gemma2Model"),
    arch="gemma2",
    rules=(
        Rule("embed_tokens", "token_embd"),
        Rule("norm", "output_norm", PLUS_ONE),
        Rule("layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q"),
        Rule("layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k"),
        Rule("layers.{bid}.self_attn.v_proj", "blk.{bid}.attn_v"),
        Rule("layers.{bid}.self_attn.o_proj", "blk.{bid}.attn_output"),
        Rule("layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate"),
        Rule("layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up"),
        Rule("layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
        Rule("layers.{bid}.input_layernorm", "blk.{bid}.attn_norm", PLUS_ONE),
        Rule("layers.{bid}.post_attention_layernorm", "blk.{bid}.post_attention_norm", PLUS_ONE),
        Rule("layers.{bid}.pre_feedforward_layernorm", "blk.{bid}.ffn_norm", PLUS_ONE),
        Rule("layers.{bid}.post_feedforward_layernorm", "blk.{bid}.post_ffw_norm", PLUS_ONE),
    ),
    drop=("lm_head",),
    params=(
        *(p for p in _DECODER_PARAMS if p[0] != "vocab_size"),
        ("attention.key_length", "head_dim"),
        ("attention.value_length", "head_dim"),
        ("attn_logit_softcapping", lambda c: float(c["attn_logit_softcapping"])),
        ("final_logit_softcapping", lambda c: float(c["final_logit_softcapping"])),
        ("attention.sliding_window", "sliding_window"),
    ),
    pooling=POOLING_LAST,
    decoder=True,
)

FAMILIES = (BERT, XLMR, XLMR_RERANKER, LLAMA, QWEN2, GEMMA2)

# Why BERT cross-encoders are refused rather than written (measured in tests/test_gguf.py).
BERT_RERANKER_REASON = (
    "llama.cpp's bert graph adds token-type row 0 to every token, while transformers gives the second text of a "
    "(query, document) pair row 1, so llama.cpp's scores would differ from the model's"
)


def supported_architectures() -> list[str]:
    return sorted(a for family in FAMILIES for a in family.architectures)


def family_for(config: dict) -> Family:
    """The family of a model's ``config.json``, or a :class:`MergeHooksError` naming the supported ones.

    Example:
        >>> family_for({"architectures": ["XLMRobertaModel"]}).name
        'XLM-RoBERTa encoder'
    """
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture == "BertForSequenceClassification":
            raise MergeHooksError(
                f"cannot write {architecture} as GGUF: {BERT_RERANKER_REASON}; write it as safetensors instead, "
                "or use an XLM-RoBERTa reranker (bge-reranker-base/large/v2-m3), whose GGUF ranks like transformers"
            )
        for family in FAMILIES:
            if architecture in family.architectures:
                return family
    named = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
    raise MergeHooksError(
        f"cannot write {named} as GGUF; supported architectures: {', '.join(supported_architectures())}"
    )


def params_for(family: Family, config: dict) -> dict[str, Any]:
    """``{arch}.<key>`` values for ``config``; keys whose config entry is missing are left out."""
    values = {}
    for key, source in family.params:
        if callable(source):
            try:
                value = source(config)
            except KeyError:
                continue
        elif isinstance(source, str):
            if config.get(source) is None:
                continue
            value = config[source]
        else:
            value = source
        values[f"{family.arch}.{key}"] = value
    return values
