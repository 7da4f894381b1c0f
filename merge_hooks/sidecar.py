"""Everything a loader needs beside the weights: config, generation config, tokenizer, sentence-transformers files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from .errors import MergeHooksError
from .paths import check_tree, confined, inside, read_json

logger = logging.getLogger(__name__)

# Tokenizer files are copied, never re-saved: a tokenizer re-saved by transformers 5 can be unloadable
# on transformers 4 ("TokenizersBackend"), a copied one loads wherever the source did.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def write_config(source: Path, directory: Path, *, dtype_name: Optional[str], architectures: Optional[list[str]] = None) -> None:
    """Copy ``config.json`` with its dtype field set to what was written.

    transformers 4.56+ writes ``dtype``, older releases ``torch_dtype``; both stacks read either.
    The field the source uses is updated; a config with neither gets ``torch_dtype``.
    """
    config = read_json(source, "config.json")
    if dtype_name is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name
    if architectures:
        config["architectures"] = list(architectures)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_and_generation_files(source: Path, directory: Path) -> list[str]:
    """Copy the first model's tokenizer files and ``generation_config.json``; return the names copied."""
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (source / name).is_file():
            shutil.copy2(confined(source, name), directory / name)
            copied.append(name)
    return copied


def _code_modules(auto_map: object) -> set[str]:
    """Module names of an ``auto_map``'s class references (``modeling_x.XModel``; ``repo--mod.Cls`` names
    code in another repo, which transformers fetches itself)."""
    refs = auto_map.values() if isinstance(auto_map, dict) else []
    modules = set()
    for ref in refs:
        for item in ref if isinstance(ref, list) else [ref]:
            if isinstance(item, str) and "--" not in item and "." in item:
                modules.add(item.rsplit(".", 1)[0])
    return modules


def copy_code_files(source: Path, directory: Path) -> list[str]:
    """Copy the Python files the source's ``auto_map`` entries name, and the files they import relatively,
    so a custom-code model's output loads with ``trust_remote_code=True``; return the names copied.

    Example:
        >>> copy_code_files(Path("custom-model"), Path("merged"))
        ['configuration_custom.py', 'modeling_custom.py']
    """
    from .preflight import CODE_CONFIGS

    wanted = set()
    for name in CODE_CONFIGS:
        if (source / name).is_file():
            wanted |= {f"{module.replace('.', '/')}.py" for module in _code_modules(read_json(source, name).get("auto_map"))}
    if not wanted:
        return []
    from transformers.dynamic_module_utils import get_relative_imports

    copied: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in copied:
            continue
        path = confined(source, name, what="custom code file")
        if not path.is_file():
            raise MergeHooksError(f"the auto_map of {source} names {name}, which is missing from that folder")
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.add(name)
        for module in get_relative_imports(str(path)):
            relative = (Path(name).parent / f"{module.replace('.', '/')}.py").as_posix()
            if inside(source, relative):
                wanted.add(relative)
    return sorted(copied)


# sentence-transformers >= 5.4 writes new module type paths and configs, which releases <= 5.3 cannot
# read; every release reads the old layout, so the common modules are written back in it.
_LEGACY_MODULE_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
_NEW_POOLING_NAMES = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens",
                      "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean": "weightedmean_tokens",
                      "lasttoken": "lasttoken"}


def _legacy_pooling_config(config: dict) -> dict:
    if "pooling_mode" not in config:
        return config
    modes = config["pooling_mode"]
    modes = {_NEW_POOLING_NAMES[m] for m in ([modes] if isinstance(modes, str) else modes)}
    legacy = {"word_embedding_dimension": config.get("embedding_dimension", config.get("word_embedding_dimension"))}
    legacy.update({f"pooling_mode_{mode}": mode in modes for mode in _POOLING_MODES})
    if "include_prompt" in config:
        legacy["include_prompt"] = config["include_prompt"]
    return legacy


def _write_legacy_layout(modules: list[dict], directory: Path, *, max_seq_length: int) -> bool:
    """Rewrite a new-layout folder's modules in the old layout; False if a module has no old equivalent."""
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if any(kind not in _LEGACY_MODULE_TYPES for kind in kinds):
        return False
    for module, kind in zip(modules, kinds):
        module["type"] = _LEGACY_MODULE_TYPES[kind]
        if kind == "Pooling":
            pooling_name = f"{module['path']}/config.json"
            pooling = _legacy_pooling_config(read_json(directory, pooling_name))
            (directory / pooling_name).write_text(json.dumps(pooling, indent=2) + "\n")
    st_config_path = directory / "sentence_bert_config.json"
    st_config = read_json(directory, st_config_path.name) if st_config_path.is_file() else {}
    st_config_path.write_text(json.dumps({
        "max_seq_length": st_config.get("max_seq_length", max_seq_length),
        "do_lower_case": st_config.get("do_lower_case", False),
    }, indent=2) + "\n")
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    return True


def _read_modules(source: Path) -> list[dict]:
    """``modules.json``: a list of modules, each with a string ``type`` and a ``path`` inside the folder."""
    modules = read_json(source, "modules.json", kind=list)
    for i, module in enumerate(modules):
        if not (isinstance(module, dict) and isinstance(module.get("type"), str)
                and isinstance(module.setdefault("path", ""), str)):
            raise MergeHooksError(f"{source / 'modules.json'}: module {i} needs a string 'type' and 'path'")
        if module["path"]:
            # The same relative path is written into the output: it must stay inside both folders.
            confined(source, module["path"], what="sentence-transformers module")
    return modules


def copy_sentence_transformers_files(source: Path, directory: Path, *, max_seq_length: int = 512) -> bool:
    """Copy the source's sentence-transformers layout (its pooling kept); False when it has none.

    A layout written by sentence-transformers >= 5.4 is written back in the old layout when it only
    uses Transformer, Pooling and Normalize modules, so the folder loads with every release.
    """
    modules_path = source / "modules.json"
    if not modules_path.is_file():
        return False
    modules = _read_modules(source)
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copy2(confined(source, name), directory / name)
    for module_dir in (m["path"] for m in modules if m["path"]):
        src = check_tree(source, module_dir, what="sentence-transformers module")
        if src.is_dir():
            shutil.copytree(src, directory / module_dir, dirs_exist_ok=True)
            if any(p.suffix in {".safetensors", ".bin", ".pt"} for p in src.rglob("*")):
                logger.warning(
                    "sentence-transformers module %s has weights of its own; they are copied from the first model, not merged",
                    module_dir,
                )
    if any(not m["type"].startswith("sentence_transformers.models.") for m in modules):
        if not _write_legacy_layout(modules, directory, max_seq_length=max_seq_length):
            logger.warning("%s uses sentence-transformers modules that only releases >= 5.4 can load", modules_path)
    return True


def write_default_sentence_transformers_files(directory: Path, *, hidden_size: int, max_seq_length: int) -> None:
    """CLS pooling + Normalize, as bge models use and LM_Cocktail writes, in the layout every
    sentence-transformers release reads (3.x to 6.x)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2) + "\n"
    )


def max_seq_length(source: Path, config: dict) -> int:
    """What sentence-transformers would pick: the tokenizer's limit, capped by the position embeddings."""
    limit = config.get("max_position_embeddings", 512)
    tok_config = source / "tokenizer_config.json"
    if tok_config.is_file():
        model_max = read_json(source, tok_config.name).get("model_max_length")
        if isinstance(model_max, int) and 0 < model_max < limit:
            limit = model_max
    return int(limit)


def check_sidecars(source: Path) -> None:
    """Check every file :func:`write_sidecars` will read from ``source`` (inside the folder, well-formed JSON),
    so a bad one stops the run before anything is merged."""
    read_json(source, "config.json")
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG, *ST_FILES):
        if (source / name).is_file() or (source / name).is_symlink():
            confined(source, name)
    if (source / "tokenizer_config.json").is_file():
        read_json(source, "tokenizer_config.json")
    if (source / "modules.json").is_file():
        for module in _read_modules(source):
            if module["path"]:
                check_tree(source, module["path"], what="sentence-transformers module")


def write_sidecars(
    source: Path,
    directory: Path,
    *,
    model_type: str,
    config: dict,
    dtype_name: Optional[str],
    architectures: Optional[list[str]] = None,
) -> None:
    """Write every non-weight file a loader of this model type needs, taken from the first model."""
    write_config(source, directory, dtype_name=dtype_name, architectures=architectures)
    copy_tokenizer_and_generation_files(source, directory)
    seq_length = max_seq_length(source, config)
    if model_type == "encoder" and not copy_sentence_transformers_files(source, directory, max_seq_length=seq_length):
        write_default_sentence_transformers_files(
            directory, hidden_size=int(config.get("hidden_size", 0)), max_seq_length=seq_length
        )
