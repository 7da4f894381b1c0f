"""``safetensors``: ``model.safetensors``, or shards plus ``model.safetensors.index.json``."""

from __future__ import annotations

from pathlib import Path

from . import OutputFormat, WriteOptions
from ..sharding import write_sharded

WEIGHTS_NAME = "model.safetensors"


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    from ..io.safetensors_io import write_safetensors

    def write_file(path: Path, shard, digest: bool):
        metadata = {"format": "pt", **options.metadata}
        return write_safetensors(path, shard, metadata=metadata, progress=options.progress, digest=digest)

    return write_sharded(source, directory, weights_name=WEIGHTS_NAME, max_shard_size=options.max_shard_size,
                         write_file=write_file, digests=options.digests)


FORMAT = OutputFormat(
    name="safetensors",
    description="model.safetensors (sharded with an index past max_shard_size); what transformers writes by default",
    write=_write,
    takes_arrays=True,
)
