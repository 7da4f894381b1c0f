"""bge-m3's ColBERT and sparse heads: ``colbert_linear.pt`` and ``sparse_linear.pt`` beside the model.

FlagEmbedding 1.4.2 (``EncoderOnlyEmbedderM3Runner.get_model``) reads both files with
``torch.load(weights_only=True)`` into ``Linear(hidden, colbert_dim or hidden)`` and ``Linear(hidden, 1)``;
when either file is missing it initialises both heads randomly and only logs it. LM_Cocktail loads
bge-m3 as a plain ``AutoModel`` and never sees the heads, so they are merged here, with the weights
and the arithmetic of the main tensors, and written under the same names.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import MergeHooksError
from .paths import confined

if TYPE_CHECKING:
    import torch

    from .preflight import InputModel

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
HEAD_FILES = (COLBERT_FILE, SPARSE_FILE)

Heads = dict[str, dict[str, "torch.Tensor"]]


def heads_present(folder: Path) -> list[str]:
    """The head files (of :data:`HEAD_FILES`) that exist in ``folder`` (each must lie inside it)."""
    present = [name for name in HEAD_FILES if (Path(folder) / name).is_file()]
    for name in present:
        confined(folder, name, what="bge-m3 head")
    return present


def load_head(path: Path) -> dict[str, "torch.Tensor"]:
    """One head's state dict, read with ``torch.load(weights_only=True)`` (nothing but tensors is unpickled).

    Example:
        >>> load_head(Path("bge-m3/sparse_linear.pt"))["weight"].shape
        torch.Size([1, 1024])
    """
    import torch

    from .io.torch_io import refused_pickle

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MergeHooksError(f"cannot read {path}: {refused_pickle(exc)}") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise MergeHooksError(f"cannot read {path} as a state dict of tensors: {exc}") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise MergeHooksError(f"{path} is not a state dict of tensors (expected what torch.save(linear.state_dict()) writes)")
    return state_dict


def _layout(state_dict: dict[str, "torch.Tensor"]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


def check_heads(models: Sequence["InputModel"]) -> bool:
    """Whether the models carry bge-m3 heads; all of them must, or none.

    The head files are small (hidden x hidden), so they are read here, before any merging, to check
    that their tensors agree between the models.

    Raises:
        MergeHooksError: a model lacks a head file another model has, or the heads differ in shape.
    """
    present = {model.spec: heads_present(model.path) for model in models}
    if not any(present.values()):
        return False
    owner = next(model for model in models if present[model.spec])
    for model in models:
        missing = [name for name in HEAD_FILES if name not in present[model.spec]]
        if missing:
            raise MergeHooksError(
                f"model {model.spec!r} has no {' and no '.join(missing)} but model {owner.spec!r} has bge-m3 heads "
                f"({', '.join(present[owner.spec])}): every model needs both {COLBERT_FILE} and {SPARSE_FILE}, or none. "
                f"Copy the heads of the model {model.spec!r} was fine-tuned from into its folder, or remove them "
                "from the others to merge the dense model only"
            )
    first = models[0]
    for name in HEAD_FILES:
        expected = _layout(load_head(first.path / name))
        for model in models[1:]:
            found = _layout(load_head(model.path / name))
            if found != expected:
                raise MergeHooksError(
                    f"models {first.spec!r} and {model.spec!r} differ in {name}: {expected} vs {found}"
                )
    return True


def merge_heads(folders: Sequence[Path], weights: Sequence[float], *, dtype: Any) -> Heads:
    """Merge each head file of ``folders`` as the main tensors are: ``w1*h1 + w2*h2 + ...`` in model order.

    Floating tensors are cast to ``dtype`` (the dtype the main weights were written in: a
    :class:`~merge_hooks.dtypes.DType`, torch dtype or name), or kept in the first model's dtype when ``dtype`` is None.

    Example:
        >>> heads = merge_heads([Path("bge-m3"), Path("bge-m3-ft")], [0.5, 0.5], dtype="float32")
        >>> heads["colbert_linear.pt"]["weight"].shape
        torch.Size([1024, 1024])
    """
    from .engines import accumulate, written_dtype

    if len(weights) != len(folders):
        raise MergeHooksError(
            f"cannot merge the bge-m3 heads: {len(folders)} models but {len(weights)} weights are known"
        )
    merged: Heads = {}
    for name in HEAD_FILES:
        sums: dict = {}
        out_dtypes: dict = {}
        for weight, folder in zip(weights, folders):
            for key, tensor in load_head(Path(folder) / name).items():
                if key not in out_dtypes:
                    out_dtypes[key] = written_dtype(tensor.dtype, dtype)
                sums[key] = accumulate(sums.get(key), weight, tensor)
        merged[name] = {key: tensor.to(out_dtypes[key].torch).contiguous() for key, tensor in sums.items()}
    return merged


def write_heads(directory: Path, heads: Heads) -> list[Path]:
    """``torch.save`` each merged head's state dict into ``directory``, as FlagEmbedding reads it."""
    import torch

    written = []
    for name, state_dict in heads.items():
        path = Path(directory) / name
        torch.save(state_dict, path)
        written.append(path)
    return written
