"""``both``: the ``safetensors`` and the ``bin`` layouts side by side (transformers prefers safetensors)."""

from __future__ import annotations

from pathlib import Path

from . import OutputFormat, WriteOptions
from .bin import FORMAT as BIN
from .safetensors import FORMAT as SAFETENSORS


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    return SAFETENSORS.write(source, directory, options) + BIN.write(source, directory, options)


FORMAT = OutputFormat(
    name="both",
    description="model.safetensors and pytorch_model.bin side by side, for loaders that read only one of them",
    write=_write,
    size_factor=2,
    takes_arrays=True,
)
