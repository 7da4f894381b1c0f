"""The ``merge-hooks`` command line.

User errors print one line, ``error: ...``, and exit with status 2; nothing is written.
``verify`` exits with status 1 when the folder fails a check.
Importing this module does not import torch: ``--help`` and ``formats`` stay fast.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import MergeHooksError
from .units import format_size

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 1
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command killed by SIGPIPE
DTYPES = ("keep", "float32", "float16", "bfloat16")


def _global_flags(*, suppress: bool) -> argparse.ArgumentParser:
    """-v and -q, accepted before and after the command (``suppress``: the command's copy keeps what came before)."""
    flags = argparse.ArgumentParser(add_help=False)
    default = {"default": argparse.SUPPRESS} if suppress else {}
    flags.add_argument("-v", "--verbose", action="count", help="log what happens (-vv for debug)",
                       **(default or {"default": 0}))
    flags.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary", **default)
    return flags


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-format", metavar="FMT",
                        help="output format(s): safetensors, bin, both, or several as FMT1,FMT2 (see 'merge-hooks formats')")
    parser.add_argument("--max-shard-size", metavar="SIZE", help="split weights into shards of at most SIZE (e.g. 5GB, 500MB)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (keep = the first model's)")
    parser.add_argument("--gguf-type", metavar="TYPE", help="GGUF tensor type: f32, f16, bf16 or q8_0 (with --save-format gguf)")
    parser.add_argument("--onnx-quantize", metavar="MODE", help="with the onnx format: also write ONNX Runtime's dynamic int8 model (qint8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier merge-hooks output (only once the new one is complete)")
    parser.add_argument("--force", action="store_true",
                        help="with --overwrite, replace a non-empty folder merge-hooks did not write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge-hooks",
        description="Merge FlagEmbedding / LM_Cocktail models and write them in the format your loader needs.",
        parents=[_global_flags(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"merge-hooks {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command_flags = [_global_flags(suppress=True)]

    merge = commands.add_parser(
        "merge",
        parents=command_flags,
        help="merge models from a YAML recipe or from flags",
        description="Merge models as LM_Cocktail does and write the result. Flags override the recipe.",
    )
    merge.add_argument("recipe", nargs="?", type=Path, help="YAML merge recipe (see configs/)")
    merge.add_argument("--model-type", choices=("encoder", "reranker", "decoder"))
    merge.add_argument("--method", choices=("mix_models", "mix_models_with_data", "mix_models_by_layers"))
    merge.add_argument("--models", nargs="+", metavar="PATH",
                       help="model folders or cached hub ids, in order; BASE+ADAPTER merges a LoRA adapter into BASE first")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per model, summing to 1")
    merge.add_argument("--examples", type=Path, help="JSON lines examples for mix_models_with_data")
    merge.add_argument("--temperature", type=float, help="mix_models_with_data: higher gives more even weights (default 5)")
    merge.add_argument("--neg-number", type=int, metavar="N", help="mix_models_with_data: negatives sampled per query (default 7)")
    merge.add_argument("--batch-size", type=int, metavar="N", help="mix_models_with_data: examples per batch when scoring (default 2)")
    merge.add_argument("--max-input-length", type=int, metavar="N",
                       help="mix_models_with_data: tokens kept per text when scoring (default 2048)")
    merge.add_argument("--seed", type=int, help="mix_models_with_data: seed the sampling of negatives (same weights every run)")
    # str, not Path: Path("") is ".", and an empty -o (an unset shell variable) must be an error.
    merge.add_argument("-o", "--output", help="output folder")
    merge.add_argument("--engine", choices=("auto", "stream", "cocktail"), help="auto (default), stream or cocktail")
    merge.add_argument("--trust-remote-code", action="store_true", default=None, help="allow models with custom code")
    merge.add_argument("--verify", action="store_true",
                       help="check the written folder (complete, loads) before it replaces anything")
    _output_flags(merge)

    convert = commands.add_parser("convert", parents=command_flags, help="re-save a model folder in another format or dtype")
    convert.add_argument("src", type=Path, help="model folder to read")
    convert.add_argument("dst", help="folder to write")
    _output_flags(convert)

    verify = commands.add_parser(
        "verify",
        parents=command_flags,
        help="check that a model folder is complete and loads (and matches its recipe)",
        description="Check a model folder: weights and index complete and readable, manifest hashes, loads with "
        "transformers, sentence-transformers and FlagEmbedding where they apply. Exit status 0 when all "
        "holds, 1 when something failed.",
    )
    verify.add_argument("folder", type=Path, help="model folder to check")
    verify.add_argument("--against", type=Path, metavar="RECIPE",
                        help="also recompute a sample of tensors from this recipe's input models and compare them bit for bit")
    verify.add_argument("--trust-remote-code", action="store_true", help="let transformers run the folder's custom code")

    commands.add_parser("formats", parents=command_flags, help="list the registered output formats")

    demo = commands.add_parser("demo", parents=command_flags, help="run an offline end-to-end demo on all-MiniLM-L6-v2")
    demo.add_argument("--workdir", type=Path,
                      help="where the demo writes (default: ~/.cache/merge-hooks/demo, outside any checkout)")
    return parser


def _recipe_from_args(args: argparse.Namespace):
    from .recipe import apply_overrides, load_recipe, model_entry_from_arg, recipe_from_dict

    overrides = {
        "model_type": args.model_type,
        "method": args.method,
        "examples": str(args.examples) if args.examples else None,
        "engine": args.engine,
        "trust_remote_code": args.trust_remote_code,
        "temperature": args.temperature,
        "neg_number": args.neg_number,
        "batch_size": args.batch_size,
        "max_input_length": args.max_input_length,
        "seed": args.seed,
        "output.path": args.output,
        "output.save_format": args.save_format,
        "output.max_shard_size": args.max_shard_size,
        "output.dtype": args.dtype,
        "output.gguf_type": args.gguf_type,
        "output.onnx_quantize": args.onnx_quantize,
    }
    if args.models or args.weights:
        models = args.models or []
        weights = args.weights
        if weights is None and args.recipe is not None:
            # --models alone replaces the recipe's paths and keeps its weights, when there is one per model.
            kept = [m.weight for m in load_recipe(args.recipe).models]
            weights = kept if len(kept) == len(models) and None not in kept else None
        if weights is not None and len(weights) != len(models):
            raise MergeHooksError(f"got {len(models)} models but {len(weights)} weights; give one weight per model")
        overrides["models"] = [
            model_entry_from_arg(p) | ({} if weights is None else {"weight": w}) for p, w in zip(models, weights or models)
        ]
    if args.recipe is not None:
        return load_recipe(args.recipe, overrides=overrides)
    if not args.models:
        raise MergeHooksError("give a recipe file, or --model-type, --models, --weights and --output")
    return recipe_from_dict(apply_overrides({}, overrides), source="command line")


def _summary(result, *, verb: str) -> str:
    lines = [f"{verb} {result.output} ({result.save_format}, {result.dtype or 'source dtype'}, engine {result.engine})"]
    if result.weights:
        lines.append("weights: " + ", ".join(f"{w:.6g}" for w in result.weights))
    width = max(len(name) for name, _ in result.files)
    for name, size in result.files:
        lines.append(f"  {name:<{width}}  {format_size(size):>9}")
    lines.append(f"  {len(result.files)} files, {format_size(result.total_bytes)}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.command == "formats":
        from .formats import available_formats

        for name, fmt in sorted(available_formats().items()):
            print(f"{name:<12} {fmt.description}")
        return 0
    if args.command == "merge":
        from .pipeline import run_recipe

        recipe = _recipe_from_args(args)
        result = run_recipe(recipe, overwrite=args.overwrite, force=args.force, quiet=args.quiet, verify=args.verify)
        if not args.quiet:
            print(_summary(result, verb="wrote" if not args.verify else "wrote and verified"))
        return 0
    if args.command == "verify":
        from .recipe import load_recipe
        from .verify import verify_folder

        recipe = load_recipe(args.against) if args.against is not None else None
        report = verify_folder(args.folder, against=recipe, trust_remote_code=args.trust_remote_code)
        print(report.render())
        return 0 if report.ok else EXIT_CHECK_FAILED
    if args.command == "convert":
        from .convert import convert

        result = convert(
            args.src,
            args.dst,
            save_format=args.save_format or "safetensors",
            max_shard_size=args.max_shard_size or "5GB",
            dtype=args.dtype or "keep",
            overwrite=args.overwrite,
            force=args.force,
            quiet=args.quiet,
            **({"gguf_type": args.gguf_type} if args.gguf_type else {}),
            **({"onnx_quantize": args.onnx_quantize} if args.onnx_quantize else {}),
        )
        if not args.quiet:
            print(_summary(result, verb="wrote"))
        return 0
    if args.command == "demo":
        from .demo import default_workdir, run_demo

        print(run_demo(args.workdir or default_workdir(), quiet=args.quiet))
        return 0
    raise AssertionError(args.command)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``merge-hooks`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Libraries warn about their own affairs (deprecations, loading details); those lines would sit
    # between a command's output and its one-line error. They are logged, and shown with -v.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    # A merge or convert is one short run: cyclic collection only costs it time (during torch's import,
    # and a full pass over every object at exit). Code that builds large object graphs (LM_Cocktail,
    # transformers models) turns it back on with collecting_garbage().
    collecting = gc.isenabled()
    if args.command in ("merge", "convert"):
        gc.disable()
        # numpy's OpenBLAS starts a thread per core that spins a while for work that never comes (merges
        # use no numpy BLAS; torch has its own): 0.1 s of a BERT-base merge's CPU time, taken from the
        # threads that do the work. Only effective before numpy is first imported.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        code = _run(args)
        sys.stdout.flush()
    except MergeHooksError as exc:
        # One line, even when a message quotes a library's multi-line one.
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # The reader (``| head``) left; Python would report the pipe again when flushing at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    finally:
        if collecting:
            gc.enable()
    gc.freeze()  # what is alive now lives until exit: spare it the final collection
    sys.exit(code)
