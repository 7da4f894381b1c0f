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
import gc
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

# ONNX opset of the exported graphs (ONNX Runtime 1.14 and later run it).
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


def _name_dimensions(model) -> None:
    """Call the inputs' symbolic dimensions ``batch`` and ``sequence`` wherever the graph's inputs and outputs use them."""
    import onnx_ir

    first = model.graph.inputs[0].shape
    names = {str(first[0]): "batch", str(first[1]): "sequence"}
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.shape = onnx_ir.Shape(
            [names.get(str(dim), dim) if isinstance(dim, onnx_ir.SymbolicDim) else dim for dim in value.shape]
        )


def save_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> list[Path]:
    """Export ``module`` called with ``inputs`` (batch and sequence dimensions dynamic) to ``path``, its
    weights in ``<path>_data`` beside it; return the files written.

    Example:
        >>> save_graph(EncoderGraph(model, ("input_ids", "attention_mask")), batch, Path("onnx/model.onnx"))
        [PosixPath('onnx/model.onnx'), PosixPath('onnx/model.onnx_data')]
    """
    import onnx_ir

    # Named Dims without a bound fail torch.export's range check (the sequence is bounded by the
    # position table), and torch.onnx.export retries with other strategies; Dim.DYNAMIC lets
    # torch.export find the ranges. The dimensions are named afterwards.
    dynamic = torch.export.Dim.DYNAMIC
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
            dynamic_shapes=(tuple({0: dynamic, 1: dynamic} for _ in inputs),),
            verbose=False,
        )
    _name_dimensions(program.model)
    data = path.with_name(layout.data_file(path.name))
    # Streaming the weights to a side file is far cheaper than building one protobuf message in onnx_ir
    # (BERT-base: 1.4 s and 1.0 GB peak against 23 s and 2.3 GB); see inline_weights for small models.
    onnx_ir.save(program.model, path, external_data=data.name)
    return [path, data] if data.is_file() else [path]


def inline_weights(path: Path, *, threshold: Optional[int] = None) -> list[Path]:
    """Move the weights of ``<path>_data`` into ``path`` when they are at most ``threshold`` bytes (default
    :data:`layout.EXTERNAL_DATA_THRESHOLD`): loaders expect one file below 2 GB. Return the files left."""
    import onnx

    data = path.with_name(layout.data_file(path.name))
    if threshold is None:
        threshold = layout.EXTERNAL_DATA_THRESHOLD
    if not data.is_file():
        return [path]
    if data.stat().st_size > threshold:
        return [path, data]
    onnx.save_model(onnx.load(str(path)), str(path))
    data.unlink()
    return [path]


def _export_graphs(folder: Path, kind: str, out_dir: Path) -> list[Path]:
    inputs = tokenize(folder, kind)
    model = load_model(folder, kind)
    graphs = []
    for name, module in graphs_for(folder, kind, model, tuple(inputs)).items():
        logger.info("exporting %s", name)
        save_graph(module, inputs, out_dir / name)
        graphs.append(out_dir / name)
    return graphs


def export_folder(folder: Path, *, kind: str, quantize: Optional[str] = None) -> list[Path]:
    """Write ``onnx/model.onnx`` (and ``onnx/model_m3.onnx`` for bge-m3, the quantized variant when asked)
    for the transformers model in ``folder``; return the files written.

    Example:
        >>> export_folder(Path("merged"), kind="encoder", quantize="qint8")
        [PosixPath('merged/onnx/model.onnx'), PosixPath('merged/onnx/model_qint8_avx512_vnni.onnx')]
    """
    folder = Path(folder)
    out_dir = folder / layout.ONNX_DIR
    out_dir.mkdir(exist_ok=True)
    graphs = _export_graphs(folder, kind, out_dir)
    # Free the PyTorch model (transformers models hold reference cycles) before the weights are inlined.
    gc.collect()
    written = [path for graph in graphs for path in inline_weights(graph)]
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
