"""``gguf``: one ``<output>-<TYPE>.gguf`` file that llama.cpp and Ollama load, written from the merge stream.

- :mod:`.families`: what llama.cpp expects of each supported architecture (name tables, transforms, keys).
- :mod:`.vocab`: the tokenizer as ``tokenizer.ggml.*`` keys.
- :mod:`.writer`: the streamed writer.
- :mod:`.check`: reading a written file back (``verify``).

Nothing here imports gguf, numpy or torch until a file is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import OutputFormat, WriteOptions
from ...errors import MergeHooksError

EXTRA_HINT = "pip install 'merge-hooks[gguf]'"


def require_gguf() -> None:
    """A one-line error naming the extra when gguf-py is not installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MergeHooksError(f"the gguf format needs the gguf package: {EXTRA_HINT}") from None


def _read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    from .writer import write_gguf

    require_gguf()
    model_dir = getattr(options, "model_dir", None)
    if model_dir is None:
        raise MergeHooksError("the gguf format needs the input model's folder (tokenizer and config)")
    output = getattr(options, "output", None)
    config = getattr(options, "config", None) or _read_config(model_dir)
    return write_gguf(
        source,
        directory,
        model_dir=Path(model_dir),
        config=config,
        output_name=getattr(options, "output_name", None) or Path(directory).name,
        gguf_type=getattr(output, "gguf_type", None),
        max_shard_size=options.max_shard_size,
        progress=options.progress,
    )


FORMAT = OutputFormat(
    name="gguf",
    description="<output>-<TYPE>.gguf for llama.cpp / Ollama (f32, f16, bf16 or q8_0; BERT, XLM-R, Llama, Qwen2, Gemma2)",
    write=_write,
    takes_arrays=True,
)
