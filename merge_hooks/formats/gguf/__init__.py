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
from typing import Optional

from .. import FormatCheck, OutputFormat, PreflightContext, WriteOptions
from ...errors import MergeHooksError

EXTRA_HINT = "pip install 'merge-hooks[gguf]'"


def require_gguf() -> None:
    """A one-line error naming the extra when gguf-py is not installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MergeHooksError(f"the gguf format needs the gguf package: {EXTRA_HINT}") from None


def _preflight(context: PreflightContext) -> None:
    """Everything that can make the GGUF impossible, checked before any merge work."""
    from ...checkpoint import Checkpoint
    from .families import family_for
    from .writer import default_gguf_type, plan_tensors, pooling_type
    from .vocab import export_vocab

    require_gguf()
    family = family_for(context.config)
    with Checkpoint(context.model_dir) as checkpoint:
        specs = list(checkpoint.specs.values())
    gguf_type = getattr(context.output, "gguf_type", None) or default_gguf_type(specs)
    planned = plan_tensors(specs, family, context.config, gguf_type)
    embedding = next((p for p in planned if p.name == "token_embd.weight"), None)
    if embedding is None:
        raise MergeHooksError(f"cannot write GGUF: {context.model_dir} has no token embedding for this {family.name}")
    export_vocab(context.model_dir, vocab_size=embedding.shape[0])
    pooling_type(family, context.model_dir)


def _size(context: PreflightContext, specs) -> int:
    """The GGUF's tensor data for ``specs``, as planned: its type's bytes (F32 tables, whole Q8_0 blocks) and padding."""
    require_gguf()
    from gguf import GGUF_DEFAULT_ALIGNMENT as ALIGNMENT

    from .families import family_for
    from .writer import default_gguf_type, plan_tensors

    gguf_type = getattr(context.output, "gguf_type", None) or default_gguf_type(specs)
    planned = plan_tensors(specs, family_for(context.config), context.config, gguf_type)
    return sum(-(-tensor.nbytes // ALIGNMENT) * ALIGNMENT for tensor in planned)


def base_model_name(model: str) -> str:
    """``general.base_model.N.name`` for an input model: the last part of its folder or hub id (for a folder
    of the Hugging Face cache, ``models--<org>--<name>/snapshots/<commit>``, the repository's name)."""
    path = Path(model)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def _write(source, directory: Path, options: WriteOptions) -> list[Path]:
    from .writer import write_gguf

    require_gguf()
    if options.model_dir is None:
        raise MergeHooksError("the gguf format needs the input model's folder (tokenizer and config)")
    config = options.config or json.loads((options.model_dir / "config.json").read_text(encoding="utf-8"))
    return write_gguf(
        source,
        directory,
        model_dir=Path(options.model_dir),
        config=config,
        output_name=options.output_name or Path(directory).name,
        gguf_type=getattr(options.output, "gguf_type", None),
        max_shard_size=options.max_shard_size,
        base_models=[base_model_name(model) for model in options.models or [str(options.model_dir)]],
        progress=options.progress,
        digests=options.digests,
    )


def _check(folder: Path) -> Optional[FormatCheck]:
    from .check import check_gguf_folder, gguf_files

    if not gguf_files(folder):
        return None
    require_gguf()
    passed, problems = check_gguf_folder(folder)
    return FormatCheck(passed=passed, problems=problems)


FORMAT = OutputFormat(
    name="gguf",
    description="<output>-<TYPE>.gguf for llama.cpp / Ollama (f32, f16, bf16, q8_0; BERT, XLM-R, Llama, Qwen2, Gemma2)",
    write=_write,
    size=_size,
    takes_arrays=True,
    preflight=_preflight,
    check=_check,
)
