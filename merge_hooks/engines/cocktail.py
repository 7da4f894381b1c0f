"""The LM_Cocktail engine: call LM_Cocktail's own merge functions with ``output_path=None``.

LM_Cocktail then writes nothing and returns the merged model, which is handed to the output stage.
Its ``print`` output is routed to logging.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from ..errors import MergeHooksError
from ..tensors import TensorSource, TensorSpec
from .. import dtypes
from ..dtypes import DType
from ..progress import loader_progress_bars, silenced_tqdm
from . import EngineResult, collecting_garbage, written_dtype

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class _LogStream(io.TextIOBase):
    """Receives LM_Cocktail's prints: logs them and keeps them (the weights it chose are only printed)."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.lines: list[str] = []
        self._partial = ""
        self._on_line = on_line

    def write(self, text: str) -> int:
        # print() hands over its arguments and the newline in separate writes: log whole lines only.
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            if line.strip():
                self.lines.append(line.strip())
                logger.info("LM_Cocktail: %s", line.strip())
                self._on_line(line.strip())
        return len(text)


def _printed_weights(lines: list[str], model_paths: list[str]) -> Optional[list[float]]:
    """The weights LM_Cocktail printed after "***weight for each model***" (one "path weight" line each)."""
    for i, line in enumerate(lines):
        if line.startswith("***weight for each model***"):
            rows = lines[i + 1 : i + 1 + len(model_paths)]
            try:
                return [float(row.rsplit(" ", 1)[1]) for row in rows]
            except (IndexError, ValueError):
                return None
    return None


def _lacks_pad_token(path: str, *, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).pad_token_id is None


def run_cocktail(
    method: str,
    model_paths: list[str],
    model_type: str,
    *,
    weights: Optional[list[float]] = None,
    examples: Optional[list[dict]] = None,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    seed: Optional[int] = None,
    trust_remote_code: bool = False,
    quiet: bool = False,
):
    """Run one of LM_Cocktail's merge functions; return the merged model (on the CPU) and the weights used.

    LM_Cocktail loads every model and the tokenizer with ``trust_remote_code=True``; unless
    ``trust_remote_code``, a model that would run code of its own is refused before anything loads.

    Two calls that crash inside LM_Cocktail 0.0.4 take the same arithmetic another way: a reranker's
    ``mix_models_by_layers`` (it builds no model) runs as ``mix_models``, and a decoder
    ``mix_models_with_data`` whose tokenizer has no pad token gets its weights from
    :func:`~merge_hooks.engines.weights.compute_weights` (same losses, padding with the eos token),
    then merges with ``mix_models``.
    """
    if not trust_remote_code:
        from ..preflight import custom_code

        for path in model_paths:
            reasons = custom_code(Path(path))
            if reasons:
                raise MergeHooksError(
                    f"model {path} uses custom code ({', '.join(reasons)}), which LM_Cocktail would run; "
                    "allow it with 'trust_remote_code: true' in the recipe or --trust-remote-code"
                )
    import LM_Cocktail
    from LM_Cocktail import utils

    from .weights import compute_weights, seeded

    if method == "mix_models_by_layers" and model_type == "reranker":
        logger.info("LM_Cocktail's mix_models_by_layers cannot build a reranker; running its mix_models instead")
        method = "mix_models"
    if method == "mix_models_with_data" and model_type == "decoder" and _lacks_pad_token(
        model_paths[0], trust_remote_code=trust_remote_code
    ):
        with collecting_garbage(), seeded(seed):
            weights = compute_weights(
                model_paths, model_type, examples, temperature=temperature, batch_size=batch_size,
                max_input_length=max_input_length, neg_number=neg_number, trust_remote_code=trust_remote_code,
                quiet=quiet,
            )
        method = "mix_models"
    from tqdm.auto import tqdm

    # transformers 5 draws an anonymous bar per model load; this one names the model LM_Cocktail loads.
    loads = tqdm(total=len(model_paths), unit="model",
                 disable=quiet, leave=False, dynamic_ncols=True)

    def follow(line: str) -> None:
        if line.startswith("loading ") and line.endswith("-"):
            loads.set_description(f"LM_Cocktail loading {line.removeprefix('loading ').rstrip(' -')}")
            loads.update()

    log = _LogStream(follow)
    with contextlib.redirect_stdout(log), collecting_garbage(), silenced_tqdm(utils, quiet=quiet), \
            loader_progress_bars(enabled=False), loads:
        if method == "mix_models":
            model = LM_Cocktail.mix_models(model_paths, model_type, weights, output_path=None)
        elif method == "mix_models_by_layers":
            model = LM_Cocktail.mix_models_by_layers(model_paths, model_type, weights, output_path=None)
        else:
            # Positional: the keyword is misspelt ``example_ata`` in 0.0.4 and fixed in later sources.
            with seeded(seed):
                model = LM_Cocktail.mix_models_with_data(
                    model_paths, model_type, examples, temperature, batch_size, max_input_length, neg_number, None
                )
    # mix_models_with_data moves the model to CUDA when there is one.
    return model.cpu(), (weights or _printed_weights(log.lines, model_paths) or [])


def tied_names(model: Any) -> set[str]:
    """Names transformers leaves out when saving because they are tied to another parameter.

    transformers 4 lists them in ``_tied_weights_keys`` (a list), transformers 5 maps them to their source (a dict).
    """
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys) if not isinstance(keys, Mapping) else set(keys.keys())


def deduplicate_shared(state_dict: Mapping[str, "torch.Tensor"], *, drop: set[str]) -> dict[str, "torch.Tensor"]:
    """Keep one name per shared tensor (tied embeddings), preferring to drop the names in ``drop``."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            groups[("empty", name)] = [name]
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(key, []).append(name)
    keep = set()
    for names in groups.values():
        candidates = [n for n in names if n not in drop] or names
        keep.add(candidates[0])
    return {name: tensor for name, tensor in state_dict.items() if name in keep}


def model_source(model: Any, *, dtype: Any) -> TensorSource:
    """The model's weights as a tensor source, tied copies removed, floating tensors cast to ``dtype``."""
    state_dict = deduplicate_shared(model.state_dict(), drop=tied_names(model))

    def out_dtype(tensor) -> DType:
        return written_dtype(tensor.dtype, dtype)

    specs = [TensorSpec(name, out_dtype(t), tuple(t.shape)) for name, t in state_dict.items()]

    def get(name: str):
        tensor = state_dict[name].detach()
        return tensor.to(device="cpu", dtype=out_dtype(tensor).torch).contiguous()

    return TensorSource(specs=specs, get=get)


def cocktail_merge(
    method: str,
    model_paths: list[str],
    model_type: str,
    *,
    dtype: Optional[DType],
    **options: Any,
) -> EngineResult:
    """Merge with LM_Cocktail and wrap the returned model for the output stage."""
    model, weights = run_cocktail(method, model_paths, model_type, **options)
    source = model_source(model, dtype=dtype)
    return EngineResult(
        source=source,
        weights=list(weights),
        dtype=dtype or dtypes.of(model.dtype),
        engine="cocktail",
        architectures=[type(model).__name__],
        model=model,
    )
