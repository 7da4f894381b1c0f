"""Does ONNX Runtime compute what PyTorch computes? One check for the write step, ``verify`` and the tests.

A padded batch of sentences of different lengths (pairs for a reranker) runs through every ONNX
graph in the folder and through the same graph module in PyTorch (see :mod:`.graphs`). The PyTorch
model is loaded from the folder's torch weights, or, in a folder with ONNX weights only, built from
``config.json`` with the weights the ONNX file carries (its initializers keep their PyTorch names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...checkpoint import is_weight_file
from .. import FormatCheck
from . import layout
from .export import graphs_for
from .graphs import load_model, tokenize

#: max abs difference allowed between ONNX Runtime and PyTorch (float32 graphs)
TOLERANCE = 1e-4
#: least cosine similarity between a quantized graph's pooled embeddings (or logits) and PyTorch's
QUANTIZED_MIN_COSINE = 0.99
_GRAPH_PREFIX = "model."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def weights_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """The transformers weights an exported graph carries, by their PyTorch names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {
        init.name[len(_GRAPH_PREFIX):]: torch.from_numpy(numpy_helper.to_array(init).copy())
        for init in model.graph.initializer
        if init.name.startswith(_GRAPH_PREFIX)
    }


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers' Pooling of ``hidden`` [batch, sequence, dim] in ``mode`` (``cls_token``, ``mean_tokens``, ...)."""
    weights = mask[:, :, None].astype(hidden.dtype)
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return np.where(weights > 0, hidden, -1e9).max(axis=1)
    if mode == "lasttoken":
        return hidden[np.arange(len(hidden)), mask.sum(axis=1) - 1]
    summed = (hidden * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    return summed / (np.sqrt(counts) if mode == "mean_sqrt_len_tokens" else counts)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] == 1:  # one logit per pair: compare the scores of the whole batch
        a, b = a.T, b.T
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def _session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_pooling_config(folder: Path, passed: list[str], problems: list[str]) -> None:
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if any(config.get(key) for key in config if key.startswith("pooling_mode_")):
        passed.append("1_Pooling/config.json names its pooling with the pooling_mode_* flags TEI and every "
                      "sentence-transformers release read")
    else:
        problems.append("1_Pooling/config.json has no pooling_mode_* flag set: TEI and sentence-transformers <= 5.3 "
                        "cannot read its pooling")


def _run_graph(path: Path, inputs: dict[str, torch.Tensor], output_names: tuple[str, ...]) -> list[np.ndarray]:
    session = _session(path)
    wanted, found = list(inputs), [i.name for i in session.get_inputs()]
    if found != wanted:
        raise ValueError(f"inputs are {found}, the tokenizer gives {wanted}")
    outputs = [o.name for o in session.get_outputs()]
    if outputs != list(output_names):
        raise ValueError(f"outputs are {outputs}, expected {list(output_names)}")
    return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})


def check_onnx(folder: Path | str, *, kind: Optional[str] = None) -> Optional[FormatCheck]:
    """Compare every ONNX graph in ``folder/onnx`` with PyTorch on a padded batch; None when there are none.

    float32 graphs must agree within :data:`TOLERANCE` (max abs difference of each output), a quantized
    ``model_qint8_avx512_vnni.onnx`` within a cosine of :data:`QUANTIZED_MIN_COSINE` of the pooled
    embeddings (logits for a reranker).

    Example:
        >>> check_onnx("merged").problems
        []
    """
    folder = Path(folder)
    files = layout.onnx_files(folder)
    if not files:
        return None
    passed: list[str] = []
    problems: list[str] = []
    config = layout.read_config(folder)
    kind = layout.model_kind(config, model_type=kind)
    graph_dir = folder / layout.ONNX_DIR
    if kind == "encoder":
        _check_pooling_config(folder, passed, problems)
    torch_weights = any(is_weight_file(p.name) for p in folder.iterdir())
    try:
        inputs = tokenize(folder, kind)
        if torch_weights:
            model = load_model(folder, kind)
            source = "the torch weights"
        else:
            model = load_model(folder, kind, state_dict=weights_from_onnx(graph_dir / layout.MODEL_FILE))
            source = "the weights in onnx/model.onnx"
        graphs = graphs_for(folder, kind, model, tuple(inputs))
    except Exception as exc:  # noqa: BLE001 - any failure to build the reference is reported, not raised
        return FormatCheck(passed, problems + [f"cannot build the PyTorch reference: {_first_line(exc)}"])
    shape = "x".join(str(n) for n in inputs["input_ids"].shape)
    reference_hidden = None
    for name, module in graphs.items():
        path = graph_dir / name
        if not path.is_file():
            problems.append(f"onnx/{name} is missing")
            continue
        with torch.no_grad():
            expected = module(*inputs.values())
        expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        if name == layout.MODEL_FILE:
            reference_hidden = expected[0]
        try:
            actual = _run_graph(path, inputs, module.output_names)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            problems.append(f"onnx/{name} does not run in ONNX Runtime: {_first_line(exc)}")
            continue
        for output, want, got in zip(module.output_names, expected, actual):
            if got.shape != want.shape:
                problems.append(f"onnx/{name}: {output} has shape {list(got.shape)}, PyTorch {list(want.shape)}")
                continue
            diff = float(np.abs(got - want).max())
            if diff <= TOLERANCE:
                passed.append(f"onnx/{name}: {output} matches PyTorch ({source}) on a padded {shape} batch "
                              f"(max abs diff {diff:.1e})")
            else:
                problems.append(f"onnx/{name}: {output} differs from PyTorch by up to {diff:.3g} "
                                f"(tolerance {TOLERANCE:g}) on a padded {shape} batch")
    for quantized in layout.QUANTIZED_FILES.values():
        path = graph_dir / quantized
        if path.is_file() and reference_hidden is not None:
            _check_quantized(folder, path, inputs, reference_hidden, kind, passed, problems)
    return FormatCheck(passed, problems)


def _check_quantized(folder: Path, path: Path, inputs: dict[str, torch.Tensor], reference: np.ndarray, kind: str,
                     passed: list[str], problems: list[str]) -> None:
    output = layout.RERANKER_OUTPUTS if kind == "reranker" else layout.ENCODER_OUTPUTS
    try:
        (actual,) = _run_graph(path, inputs, output)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        problems.append(f"onnx/{path.name} does not run in ONNX Runtime: {_first_line(exc)}")
        return
    if kind == "reranker":
        what = "logits"
    else:
        mode = layout.pooling_mode(folder)
        mask = inputs["attention_mask"].numpy()
        actual, reference = pool(actual, mask, mode), pool(reference, mask, mode)
        what = f"{mode} pooled embeddings"
    cosine = _min_cosine(actual, reference)
    if cosine >= QUANTIZED_MIN_COSINE:
        passed.append(f"onnx/{path.name}: {what} agree with PyTorch (least cosine {cosine:.4f})")
    else:
        problems.append(f"onnx/{path.name}: {what} differ from PyTorch (least cosine {cosine:.4f}, "
                        f"needs {QUANTIZED_MIN_COSINE})")
