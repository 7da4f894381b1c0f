"""``both``: the ``safetensors`` and the ``bin`` layouts side by side (transformers prefers safetensors).

A name for ``[safetensors, bin]``: both files are written from one pass over the merged tensors.
"""

from __future__ import annotations

from . import OutputFormat

FORMAT = OutputFormat(
    name="both",
    description="model.safetensors and pytorch_model.bin side by side, for loaders that read only one of them",
    alias_of=("safetensors", "bin"),
)
