"""Read a model folder's weights lazily, one tensor at a time, whatever layout it was saved in."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from .dtypes import DType
from .errors import MergeHooksError
from .paths import confined, read_json
from .tensors import TensorSpec

if TYPE_CHECKING:
    import numpy
    import torch

# In the order transformers prefers them when a folder holds several.
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
WEIGHT_LAYOUTS = (
    (SAFETENSORS_NAME, "safetensors"),
    (f"{SAFETENSORS_NAME}.index.json", "safetensors"),
    (BIN_NAME, "bin"),
    (f"{BIN_NAME}.index.json", "bin"),
)


def is_weight_file(name: str) -> bool:
    """Whether a file name belongs to a transformers weight layout (single file, shard or index)."""
    return (name.startswith("model") and (name.endswith(".safetensors") or name == f"{SAFETENSORS_NAME}.index.json")) or (
        name.startswith("pytorch_model") and (name.endswith(".bin") or name == f"{BIN_NAME}.index.json")
    )


class Checkpoint:
    """The weights of one model folder: specs known up front, tensors read on demand.

    Safetensors files are read with ``pread`` and ``.bin`` files with ``torch.load(weights_only=True,
    mmap=True)``; at most one ``.bin`` file is mapped at a time, so memory stays near the size of
    the tensor being read.

    Example:
        >>> with Checkpoint("bge-base") as ckpt:
        ...     emb = ckpt.get("embeddings.word_embeddings.weight")
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.format, self.files = self._find_files()
        self._readers: dict[str, object] = {}
        self._file_of: dict[str, str] = {}
        self.specs: dict[str, TensorSpec] = {}
        for filename in self.files:
            reader = self._reader(filename)
            for spec in reader.specs:
                self.specs[spec.name] = spec
                self._file_of[spec.name] = filename
            if self.format == "bin":
                self._close(filename)

    def _find_files(self) -> tuple[str, list[str]]:
        for name, fmt in WEIGHT_LAYOUTS:
            path = self.folder / name
            if not path.is_file():
                continue
            confined(self.folder, name, what="weights file")
            if not name.endswith(".index.json"):
                return fmt, [name]
            weight_map = read_json(self.folder, name).get("weight_map")
            if not (isinstance(weight_map, dict) and weight_map
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
                raise MergeHooksError(f"{path} is not a valid weight index: 'weight_map' must map tensor names to file names")
            files = list(dict.fromkeys(weight_map.values()))
            for f in files:
                confined(self.folder, f, what=f"shard named by {name}")
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise MergeHooksError(f"{path} names shard {missing[0]}, which is missing from {self.folder}")
            return fmt, files
        looked = ", ".join(name for name, _ in WEIGHT_LAYOUTS)
        raise MergeHooksError(f"no weights found in {self.folder} (looked for {looked})")

    def _reader(self, filename: str):
        reader = self._readers.get(filename)
        if reader is None:
            path = self.folder / filename
            try:
                if self.format == "safetensors":
                    from .io.safetensors_io import SafetensorsReader

                    reader = SafetensorsReader(path)
                else:
                    from .io.torch_io import TorchReader

                    for other in list(self._readers):
                        self._close(other)
                    reader = TorchReader(path)
            except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
                reason = "the file is empty" if path.stat().st_size == 0 else str(exc).splitlines()[0]
                raise MergeHooksError(f"cannot read weights file {path}: {reason}") from None
            self._readers[filename] = reader
        return reader

    def _close(self, filename: str) -> None:
        reader = self._readers.pop(filename, None)
        if reader is not None:
            reader.close()

    def get(
        self, name: str, *, out: Optional["torch.Tensor"] = None, rows: Optional[tuple[int, int]] = None
    ) -> "torch.Tensor":
        """The tensor called ``name`` (or its ``rows=(start, stop)``), as an owned CPU tensor, or read into ``out``."""
        return self._reader(self._file_of[name]).get(name, out=out, rows=rows)

    def get_array(
        self, name: str, *, out: Optional["numpy.ndarray"] = None, rows: Optional[tuple[int, int]] = None
    ) -> "numpy.ndarray":
        """The tensor called ``name`` (or its ``rows``) as a numpy array (in its dtype's ``storage``); safetensors only."""
        if self.format != "safetensors":
            raise TypeError(f"{self.folder} holds {self.format} weights, which are read as torch tensors only")
        return self._reader(self._file_of[name]).get_array(name, out=out, rows=rows)

    def element_reader(self, name: str, start: int, count: int) -> Callable[[int, memoryview], None]:
        """``read(i, view)``: tensor ``name``'s elements from ``start + i`` into ``view``'s bytes, within
        ``start:start + count``; safetensors only (see :meth:`SafetensorsReader.element_reader`)."""
        return self._reader(self._file_of[name]).element_reader(name, start, count)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    @property
    def dtype(self) -> Optional[DType]:
        """The floating dtype most of the weights are stored in (``None`` if there are no floating tensors)."""
        counts = Counter()
        for spec in self.specs.values():
            if spec.dtype.is_floating_point:
                counts[spec.dtype] += spec.numel
        return counts.most_common(1)[0][0] if counts else None

    def close(self) -> None:
        for filename in list(self._readers):
            self._close(filename)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
