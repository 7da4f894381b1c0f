"""``bin``: ``pytorch_model.bin`` (a ``torch.save`` archive), or shards plus ``pytorch_model.bin.index.json``.

Written by merge-hooks itself, never through ``save_pretrained(safe_serialization=False)``,
which transformers 5 silently ignores.
"""

from __future__ import annotations

from pathlib import Path

from . import OutputFormat, WriteOptions
from ..sharding import write_sharded

WEIGHTS_NAME = "pytorch_model.bin"


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    from ..io.torch_io import write_torch

    def write_file(path: Path, shard, digest: bool):
        return write_torch(path, shard, progress=options.progress, digest=digest)

    return write_sharded(source, directory, weights_name=WEIGHTS_NAME, max_shard_size=options.max_shard_size,
                         write_file=write_file, digests=options.digests)


FORMAT = OutputFormat(
    name="bin",
    description="pytorch_model.bin (torch.save pickle, sharded with an index past max_shard_size); no safetensors",
    write=_write,
    takes_arrays=True,
)
