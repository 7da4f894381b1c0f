"""Where the ONNX files go and what each graph computes; nothing here imports torch or onnx.

sentence-transformers' ONNX backend looks for ``onnx/model.onnx`` (after ``model.onnx``), optimum and
TEI load it from there too, and all of them expect a model past 2 GB to keep its weights in
``onnx/model.onnx_data`` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ...heads import HEAD_FILES

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
M3_FILE = "model_m3.onnx"
# The name sentence-transformers' export_dynamic_quantized_onnx_model gives ONNX Runtime's dynamic int8
# model with its "avx512_vnni" configuration (int8 symmetric per-channel weights, uint8 activations),
# which is what QUANTIZE_MODES["qint8"] applies: users load it with model_kwargs={"file_name": ...}.
QUANTIZED_FILES = {"qint8": "model_qint8_avx512_vnni.onnx"}
QUANTIZE_MODES = tuple(QUANTIZED_FILES)
# ONNX files are protobuf messages, which cannot exceed 2 GiB; past this many bytes of weights they
# go to "<file>_data" beside the graph, the name optimum and sentence-transformers use.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

ENCODER_OUTPUTS = ("last_hidden_state",)
RERANKER_OUTPUTS = ("logits",)
M3_OUTPUTS = ("dense_vecs", "sparse_vecs", "colbert_vecs")


def data_file(graph_file: str) -> str:
    """``model.onnx`` -> ``model.onnx_data``."""
    return f"{graph_file}_data"


def model_kind(config: dict, *, model_type: Optional[str] = None) -> str:
    """``encoder``, ``reranker`` or ``decoder``: the recipe's model type, else what the config's architecture is."""
    if model_type is not None:
        return model_type
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "reranker"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or config.get("is_decoder"):
        return "decoder"
    return "encoder"


def is_m3(folder: Path) -> bool:
    """bge-m3: both of FlagEmbedding's head files lie beside the model."""
    return all((Path(folder) / name).is_file() for name in HEAD_FILES)


def onnx_files(folder: Path) -> list[Path]:
    """The files of this format in ``folder`` (graphs and their external data)."""
    directory = Path(folder) / ONNX_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx_data")))


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def pooling_mode(folder: Path) -> str:
    """The sentence-transformers pooling of the folder (``cls``, ``mean``, ...); ``cls`` when it has none, as bge uses."""
    path = Path(folder) / "1_Pooling" / "config.json"
    if not path.is_file():
        return "cls"
    config = json.loads(path.read_text(encoding="utf-8"))
    for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken"):
        if config.get(f"pooling_mode_{mode}"):
            return mode
    return "cls_token"
