"""Export a model folder to ONNX with ``torch.onnx.export``'s dynamo exporter, and quantize it.

The dynamo exporter (with onnxscript) is used because it gives correct graphs for padded batches on
both transformers 4 and 5; the graphs of the TorchScript exporter (``dynamo=False``) differed from
PyTorch by up to 3.0 on a batch padded differently from the example (tiny BERT, torch 2.13, both stacks).
The graph is saved unoptimized: every weight keeps its PyTorch name as an initializer, so the
check can rebuild the PyTorch model from an ONNX file alone. ONNX Runtime folds the remaining
transposes when it loads the graph.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from ...errors import MergeHooksError
from . import layout
from .graphs import EncoderGraph, RerankerGraph, load_model, m3_graph, tokenize

logger = logging.getLogger(__name__)

# ONNX opset of the exported graphs: ONNX Runtime >= 1.16 runs it.
OPSET = 18


def graphs_for(folder: Path, kind: str, model: torch.nn.Module, input_names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Graph file name -> module to export (or run as the reference) for the model in ``folder``."""
    if kind == "decoder":
        raise MergeHooksError("the onnx format writes encoders and rerankers; decoder models are not supported")
    graphs: dict[str, torch.nn.Module] = {
        layout.MODEL_FILE: (RerankerGraph if kind == "reranker" else EncoderGraph)(model, input_names).eval()
    }
    if kind == "encoder" and layout.is_m3(folder):
        graphs[layout.M3_FILE] = m3_graph(model, input_names, folder)
    return graphs


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about deprecations and optional packages (torchvision) that do not concern its user."""
    exporter_logger = logging.getLogger("torch.onnx")
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_logger.setLevel(level)


def save_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path, *,
               external_data_threshold: Optional[int] = None) -> list[Path]:
    """Export ``module`` called with ``inputs`` (batch and sequence dimensions dynamic) to ``path``.

    Weights go to ``<path>_data`` beside it when they exceed ``external_data_threshold`` bytes
    (default :data:`layout.EXTERNAL_DATA_THRESHOLD`).
    Returns the files written.

    Example:
        >>> save_graph(EncoderGraph(model, ("input_ids", "attention_mask")), batch, Path("onnx/model.onnx"))
        [PosixPath('onnx/model.onnx')]
    """
    import onnx_ir

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            tuple(inputs.values()),
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(module.output_names),
            # One entry for the modules' *inputs, holding one spec per tensor.
            dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in inputs),),
            verbose=False,
        )
    if external_data_threshold is None:
        external_data_threshold = layout.EXTERNAL_DATA_THRESHOLD
    external = _parameter_bytes(module) > external_data_threshold
    data_name = layout.data_file(path.name)
    onnx_ir.save(program.model, path, external_data=data_name if external else None)
    return [path, path.with_name(data_name)] if external else [path]


def export_folder(folder: Path, *, kind: str, quantize: Optional[str] = None,
                  external_data_threshold: Optional[int] = None) -> list[Path]:
    """Write ``onnx/model.onnx`` (and ``onnx/model_m3.onnx`` for bge-m3, the quantized variant when asked)
    for the transformers model in ``folder``; return the files written.

    Example:
        >>> export_folder(Path("merged"), kind="encoder", quantize="qint8")
        [PosixPath('merged/onnx/model.onnx'), PosixPath('merged/onnx/model_qint8_avx512_vnni.onnx')]
    """
    folder = Path(folder)
    inputs = tokenize(folder, kind)
    model = load_model(folder, kind)
    out_dir = folder / layout.ONNX_DIR
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    for name, module in graphs_for(folder, kind, model, tuple(inputs)).items():
        logger.info("exporting %s", name)
        written += save_graph(module, inputs, out_dir / name, external_data_threshold=external_data_threshold)
    if quantize is not None:
        written += quantize_graph(out_dir / layout.MODEL_FILE, mode=quantize)
    return written


@contextlib.contextmanager
def _without_preprocess_advice():
    """ONNX Runtime's quantizer advises, on the root logger, to run its pre-processing, whose shape
    inference fails on the exporter's graphs; the onnxscript optimizer does what the quantizer needs."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_graph(path: Path, *, mode: str) -> list[Path]:
    """ONNX Runtime's dynamic quantization of ``path`` into ``layout.QUANTIZED_FILES[mode]`` beside it.

    The graph is optimized first (a copy, in a temporary folder): dynamic quantization only rewrites
    MatMuls whose weights are initializers, not the transposes the unoptimized graph keeps.
    """
    import onnx_ir
    import onnxscript
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if mode not in layout.QUANTIZED_FILES:
        raise MergeHooksError(f"unknown onnx_quantize mode {mode!r}; known: {', '.join(layout.QUANTIZE_MODES)}")
    target = path.with_name(layout.QUANTIZED_FILES[mode])
    external = path.with_name(layout.data_file(path.name)).is_file()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantize-") as tmp:
        optimized = Path(tmp) / path.name
        model = onnx_ir.load(path)
        onnxscript.optimizer.optimize(model)
        onnx_ir.save(model, optimized, external_data=layout.data_file(path.name) if external else None)
        del model
        with _without_preprocess_advice():
            quantize_dynamic(
                optimized,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=False,
                use_external_data_format=external,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(target.name))
