"""``onnx``: ``onnx/model.onnx`` for ONNX Runtime, sentence-transformers' ONNX backend and TEI.

The export needs the merged model in PyTorch once: ``write`` stages the merged weights as
``model.safetensors`` (unless a torch format is written anyway), ``finish`` loads the model from the
staging folder with transformers, exports it with ``torch.onnx.export``, checks the ONNX graphs
against PyTorch with ONNX Runtime (:func:`.check.check_onnx`, also what ``verify`` runs) and removes
the staged weights again when no torch format was asked for.

Graphs (float32, inputs int64 with dynamic batch and sequence):

- encoders: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer gives them)
  -> ``last_hidden_state``;
- rerankers: the same inputs -> ``logits``;
- bge-m3 (``colbert_linear.pt`` and ``sparse_linear.pt`` in the folder): also ``onnx/model_m3.onnx``
  -> ``dense_vecs``, ``sparse_vecs``, ``colbert_vecs`` as FlagEmbedding's ``BGEM3FlagModel`` computes them;
- ``output.onnx_quantize: qint8``: also ``onnx/model_qint8_avx512_vnni.onnx``.

Nothing here imports torch or onnx at import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from ...checkpoint import is_weight_file
from ...errors import MergeHooksError
from .. import FormatCheck, OutputFormat, PreflightContext, WriteOptions
from ..safetensors import FORMAT as SAFETENSORS
from . import layout

#: Formats that write transformers weights; when one of them is written, ``onnx`` stages none of its own.
TORCH_FORMATS = ("safetensors", "bin")
#: import name -> what the ``[onnx]`` extra installs for it
REQUIRED_MODULES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "onnx_ir": "onnx-ir"}
EXTRA_HINT = "pip install 'merge-hooks[onnx]'"


def missing_modules() -> list[str]:
    """The packages of the ``[onnx]`` extra that are not installed (found without importing them)."""
    return [package for module, package in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]


def _require_extra() -> None:
    missing = missing_modules()
    if missing:
        raise MergeHooksError(f"the onnx format needs {', '.join(missing)}: {EXTRA_HINT}")


def _stages_weights(formats: tuple[str, ...]) -> bool:
    return not any(name in TORCH_FORMATS for name in formats)


def _preflight(context: PreflightContext) -> None:
    kind = layout.model_kind(context.config, model_type=context.model_type)
    if kind == "decoder":
        architecture = ", ".join(context.config.get("architectures") or [context.config.get("model_type", "?")])
        raise MergeHooksError(
            f"the onnx format writes encoders and rerankers, not decoder models ({architecture}); "
            "write safetensors (or gguf) for decoders"
        )
    _require_extra()


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    if not _stages_weights(options.formats):
        return []
    return SAFETENSORS.write(source, directory, options)


def _finish(directory: Path, options: WriteOptions) -> list[Path]:
    _require_extra()
    from ...engines import collecting_garbage
    from ...progress import loader_progress_bars
    from .check import check_onnx
    from .export import export_folder

    quantize: Optional[str] = getattr(options.output, "onnx_quantize", None)
    kind = layout.model_kind(layout.read_config(directory), model_type=options.model_type)
    # Two transformers models are built and dropped here (export, then the check's reference).
    with collecting_garbage(), loader_progress_bars(enabled=False):
        written = export_folder(directory, kind=kind, quantize=quantize)
        result = check_onnx(directory, kind=kind)
    if result.problems:
        raise MergeHooksError(
            "the ONNX export does not compute what the PyTorch model computes, nothing was written: "
            + "; ".join(result.problems)
        )
    if _stages_weights(options.formats):
        for path in directory.iterdir():
            if is_weight_file(path.name):
                path.unlink()
    return written


def _check(folder: Path) -> Optional[FormatCheck]:
    if not layout.onnx_files(folder):
        return None
    missing = missing_modules()
    if missing:
        return FormatCheck(problems=[f"ONNX files found but {', '.join(missing)} not installed: {EXTRA_HINT}"])
    from .check import check_onnx

    return check_onnx(folder)


FORMAT = OutputFormat(
    name="onnx",
    description="onnx/model.onnx (+ bge-m3's model_m3.onnx, optional int8) for ONNX Runtime, "
    "sentence-transformers backend='onnx' and TEI; checked against PyTorch",
    write=_write,
    takes_arrays=True,
    preflight=_preflight,
    finish=_finish,
    check=_check,
)
