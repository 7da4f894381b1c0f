"""peft LoRA adapters as merge inputs: read, checked and merged into their base one tensor at a time.

A model entry ``{path: ./base, adapter: ./lora-out}`` stands for what FlagEmbedding's ``save_merged_model``
writes (``PeftModel.from_pretrained(base, adapter).merge_and_unload()``), without ever holding the base:
each base tensor is read, the adapter's delta for it computed and added, and the result handed on to
the weighted mix. Several adapters are merged one after the other, as FlagEmbedding's ``raw_peft`` does.

FlagEmbedding's layout is understood: the newest ``checkpoint-N`` subfolder when the folder itself holds
no adapter, ``embedding/emb.pth`` (the embedding resized for added tokens, a pickled ``nn.Embedding``
read with ``weights_only=True``) and the adapter folder's own tokenizer.

What "bit-identical" means: the merged tensors equal those of peft 0.21.2's ``merge_and_unload`` on a base
loaded in the dtype merge-hooks computes in: each tensor's stored dtype with ``dtype: keep`` (what
transformers 5 loads by default), float32 with ``dtype: float32`` (what transformers 4 loads by default, and so
what FlagEmbedding merges in), float16 or bfloat16 when asked. peft upcasts the adapter's own weights to float32
(``autocast_adapter_dtype``), computes the delta in float32 and rounds once into the base tensor's dtype.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import dtypes
from .checkpoint import Checkpoint
from .dtypes import DType
from .errors import MergeHooksError
from .paths import confined, read_json
from .tensors import TensorSpec

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
EMBEDDING_FILE = Path("embedding") / "emb.pth"
# How FlagEmbedding's find_largest_checkpoint recognises a trainer checkpoint (re.search on each name).
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# peft saves adapter tensors under the wrapped model's names behind this prefix.
PEFT_PREFIX = "base_model.model."
# Input embedding tensor names, as the decoder families FlagEmbedding fine-tunes save them.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
LM_HEAD = "lm_head.weight"

# init_lora_weights values that leave the base weights as they are and merge as plain LoRA (PiSSA, OLoRA,
# CorDA and LoftQ rewrite the base during initialisation, so the saved adapter only fits that rewritten base;
# MiCA is a variant with its own layer class).
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")
# LoraConfig fields whose presence means a variant merge-hooks does not reproduce.
_UNSUPPORTED_FIELDS = {
    "layer_replication": "layer_replication (the adapter expects duplicated layers)",
    "use_qalora": "QALoRA (a quantized base)",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (it cannot be merged)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "megatron_config": "Megatron layers",
}
_LORA_SUFFIXES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}


def merge_lora(
    weight: "torch.Tensor",
    lora_A: "torch.Tensor",
    lora_B: "torch.Tensor",
    *,
    scaling: float,
    embedding: bool = False,
    fan_in_fan_out: bool = False,
    magnitude: Optional["torch.Tensor"] = None,
) -> "torch.Tensor":
    """``weight`` with one LoRA module merged, exactly as peft 0.21.2 merges it on CPU.

    Mirrors ``peft/tuners/lora/layer.py`` (``Linear.merge`` / ``Embedding.merge`` and their
    ``get_delta_weight``) and ``variants.py`` (``DoraLinearVariant.merge_unsafe``,
    ``DoraEmbeddingVariant.merge_unsafe``) in their order of operations and dtypes. ``lora_A`` and
    ``lora_B`` are taken in float32, as ``PeftModel.from_pretrained`` upcasts them (``autocast_adapter_dtype``).
    The result has ``weight``'s dtype; ``weight`` may be modified in place.

    The whole weight is merged at once (see :meth:`Adapter.needs_whole`).

    Example:
        >>> merged = merge_lora(base["q_proj.weight"], ad["q_proj.lora_A.weight"], ad["q_proj.lora_B.weight"], scaling=2.0)
    """
    import torch

    lora_A, lora_B = lora_A.float(), lora_B.float()
    transposed = embedding or fan_in_fan_out
    # Scaled in place: the same bits as peft's ``(...) * scaling``, without a second copy of the delta.
    delta = (lora_B @ lora_A).mul_(scaling)
    if embedding or fan_in_fan_out:
        delta = delta.T
    if magnitude is None:
        # Linear adds the float32 delta in place (one rounding into W's dtype); Embedding rounds the delta first.
        return weight.add_(delta.to(weight.dtype) if embedding else delta)
    # DoRA: rescale each output row (column with fan_in_fan_out, embedding dimension for embeddings) of W + delta
    # to the trained magnitude; the norm is taken of the unmerged weight plus the delta, in float32.
    combined = (weight.T if transposed else weight) + (delta.T if transposed else delta)
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = magnitude.float() / weight_norm
    factor = factor.view(1, -1) if transposed else factor.view(-1, 1)
    return (factor * (weight + delta)).to(weight.dtype)


@dataclass
class LoraModule:
    """One adapted module: where its tensors are in the adapter file and how it is scaled."""

    module: str  # the module's path in the model peft wrapped, as patterns and the file name it
    embedding: bool
    rank: int
    alpha: float
    scaling: float
    tensors: dict[str, str] = field(default_factory=dict)  # role (A, B, bias, magnitude) -> adapter tensor name


@dataclass
class Adapter:
    """One LoRA adapter folder, read and checked against its base; tensors are read when applied."""

    spec: str
    path: Path  # the folder holding adapter_config.json (a checkpoint-N subfolder when found there)
    config: dict
    reader: Any
    modules: dict[str, LoraModule]  # base weight tensor name -> module
    biases: dict[str, LoraModule]  # base bias tensor name -> module with a trained lora_B bias
    replaced: dict[str, str]  # base tensor name -> adapter tensor that replaces it (modules_to_save, base_layer)
    embedding_file: Optional[Path] = None
    tokenizer_folder: Optional[Path] = None

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    def describe(self) -> dict:
        """Provenance: which adapter, its ranks and scalings, as recorded in merge_info.json and the card."""
        from .card import sha256_file

        scalings = sorted({(m.rank, m.alpha, m.scaling) for m in self.modules.values()})
        weights = Path(self.reader.path)
        return {
            "adapter": self.spec,
            "folder": str(self.path),
            "weights": {"file": weights.name, "sha256": sha256_file(weights)},
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "use_dora": bool(self.config.get("use_dora")),
            "scaling": [{"r": r, "lora_alpha": a, "scaling": s} for r, a, s in scalings],
            "modules": len(self.modules),
            "replaced_tensors": len(self.replaced),
            "resized_embedding": self.embedding_file is not None,
        }

    def tensor(self, name: str) -> "torch.Tensor":
        return self.reader.get(name)

    def needs_whole(self, name: str) -> bool:
        """Whether base tensor ``name`` must be merged whole: it has a LoRA delta.

        peft computes ``B @ A`` for the whole weight in one product, and BLAS libraries choose their kernels by
        the matrix's shape: on an AMD EPYC with MKL, products of 1-7 or 17 rows differed in the last bit from
        the same rows of the whole product (32 of 60 shapes tried), while an Intel Xeon gave equal bits. A
        tensor with a delta is therefore merged whole, once, and its blocks cut from it; DoRA needs the
        whole tensor anyway for its norms.
        """
        return name in self.modules

    def apply(self, name: str, tensor: "torch.Tensor", *, rows: Optional[tuple[int, int]] = None) -> "torch.Tensor":
        """``tensor`` (base tensor ``name``, or its ``rows``, in the dtype the base is loaded in) after this adapter."""
        replacement = self.replaced.get(name)
        if replacement is not None:
            # load_state_dict copies into the loaded module, in its dtype.
            tensor = _row_block(self.tensor(replacement), rows).to(tensor.dtype)
        module = self.modules.get(name)
        if module is not None:
            tensor = merge_lora(
                tensor,
                self.tensor(module.tensors["A"]),
                self.tensor(module.tensors["B"]),
                scaling=module.scaling,
                embedding=module.embedding,
                fan_in_fan_out=self.fan_in_fan_out and not module.embedding,
                magnitude=self.tensor(module.tensors["magnitude"]) if "magnitude" in module.tensors else None,
            )
        module = self.biases.get(name)
        if module is not None:
            tensor.add_(_row_block(self.tensor(module.tensors["bias"]), rows).float() * module.scaling)
        return tensor

    def close(self) -> None:
        self.reader.close()


def _row_block(tensor: "torch.Tensor", rows: Optional[tuple[int, int]]) -> "torch.Tensor":
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def split_model_spec(spec: str) -> tuple[str, list[str]]:
    """``./base+./lora1+./lora2`` -> (``./base``, [``./lora1``, ``./lora2``]): mergekit's ``+`` convention.

    A path that exists as given (even with a ``+`` in its name) is taken whole.

    Example:
        >>> split_model_spec("./base+./lora-out")
        ('./base', ['./lora-out'])
    """
    if "+" not in spec or Path(spec).expanduser().exists():
        return spec, []
    base, *adapters = spec.split("+")
    if not base or not all(adapters):
        raise MergeHooksError(f"model {spec!r}: write BASE+ADAPTER[+ADAPTER...] with no empty parts")
    return base, adapters


def find_adapter_folder(spec: str) -> Path:
    """The folder holding ``adapter_config.json``: ``spec`` itself or, as FlagEmbedding's
    ``find_largest_checkpoint`` looks, its ``checkpoint-N`` subfolder with the largest N."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise MergeHooksError(f"adapter {spec!r} is not a folder")
    if (folder / CONFIG_NAME).is_file():
        return folder
    numbered = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.search(child.name)
        if match and child.is_dir():
            numbered.append((int(match.group(1)), child))
    if numbered:
        newest = max(numbered)[1]
        if (newest / CONFIG_NAME).is_file():
            logger.info("adapter %s: using its newest trainer checkpoint %s", spec, newest.name)
            return newest
    raise MergeHooksError(
        f"adapter {spec!r} has no {CONFIG_NAME} (nor has a checkpoint-N subfolder one); give the folder that "
        "peft's save_pretrained wrote"
    )


def read_adapter_config(folder: Path, spec: str) -> dict:
    config = read_json(folder, CONFIG_NAME, what=f"adapter {spec!r}: {folder / CONFIG_NAME}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise MergeHooksError(
            f"adapter {spec!r} is a peft {peft_type or 'unknown'} adapter; merge-hooks merges LoRA adapters only"
        )
    init = config.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS:
        raise MergeHooksError(
            f"adapter {spec!r} was initialised with init_lora_weights={init!r}: PiSSA, OLoRA, CorDA and LoftQ "
            "rewrite the base weights (convert the adapter to a plain LoRA with peft's save_pretrained("
            "path_initial_model_for_weight_conversion=...) first), MiCA is a variant merge-hooks does not merge"
        )
    for key, what in _UNSUPPORTED_FIELDS.items():
        if config.get(key) not in (None, False, {}, []):
            raise MergeHooksError(f"adapter {spec!r} uses {what}, which merge-hooks cannot merge; merge it with peft")
    return config


def _open_weights(folder: Path, spec: str):
    for name in WEIGHT_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        confined(folder, name, what=f"adapter {spec!r} weights")
        try:
            if name.endswith(".safetensors"):
                from .io.safetensors_io import SafetensorsReader

                return SafetensorsReader(path)
            from .io.torch_io import TorchReader

            return TorchReader(path)
        except (ValueError, OSError, RuntimeError) as exc:
            raise MergeHooksError(f"adapter {spec!r}: cannot read {path}: {exc}") from None
    raise MergeHooksError(f"adapter {spec!r} has no weights ({' or '.join(WEIGHT_NAMES)}) in {folder}")


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first key (in the config's order) matching the module path's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _name_mapper(adapter_names: list[str], base_names: set[str]):
    """Map the wrapped model's tensor names onto the checkpoint's: identical, or one leading prefix added or
    removed (FlagEmbedding trains embedders on ``AutoModel``, whose names lack the ``model.`` of a saved
    ``*ForCausalLM`` checkpoint)."""
    if all(n in base_names for n in adapter_names):
        return lambda n: n
    probe = next(n for n in adapter_names if n not in base_names)
    for base_name in base_names:
        if base_name.endswith("." + probe):
            prefix = base_name[: -len(probe)]
            return lambda n, p=prefix: p + n
    if "." in probe:
        prefix = probe.split(".", 1)[0] + "."
        if probe.removeprefix(prefix) in base_names:
            return lambda n, p=prefix: n.removeprefix(p)
    return lambda n: n


def read_adapter(spec: str, base: Checkpoint, *, base_spec: str) -> Adapter:
    """Read and check one adapter folder against the base checkpoint it will be merged into.

    Raises :class:`MergeHooksError` for anything peft would refuse or merge differently: a missing config or
    weights, a non-LoRA type or variant, modules the base does not have, shapes or ranks that do not fit.

    Example:
        >>> adapter = read_adapter("./lora-out", Checkpoint("./base"), base_spec="./base")
    """
    path = find_adapter_folder(spec)
    config = read_adapter_config(path, spec)
    reader = _open_weights(path, spec)
    try:
        return _plan(spec, path, config, reader, base, base_spec=base_spec)
    except BaseException:
        reader.close()
        raise


def _plan(spec: str, path: Path, config: dict, reader: Any, base: Checkpoint, *, base_spec: str) -> Adapter:
    specs = {s.name: s for s in reader.specs}
    modules: dict[str, LoraModule] = {}
    plain: dict[str, str] = {}  # wrapped model's tensor name -> adapter tensor name
    for key in specs:
        if not key.startswith(PEFT_PREFIX):
            raise MergeHooksError(f"adapter {spec!r}: tensor {key!r} is not a peft adapter tensor ({PEFT_PREFIX}...)")
        inner = key[len(PEFT_PREFIX):]
        for suffix, role in _LORA_SUFFIXES.items():
            if inner.endswith("." + suffix):
                module = inner[: -len(suffix) - 1]
                entry = modules.setdefault(module, LoraModule(module, False, 0, 0.0, 0.0))
                entry.embedding |= suffix.startswith("lora_embedding")
                entry.tensors[role] = key
                break
        else:
            if ".lora_" in inner:
                raise MergeHooksError(f"adapter {spec!r}: tensor {key!r} is not a LoRA tensor merge-hooks knows")
            plain[inner.replace(".base_layer.", ".")] = key

    use_rslora = bool(config.get("use_rslora"))
    for module in modules.values():
        missing = [role for role in ("A", "B") if role not in module.tensors]
        if missing:
            raise MergeHooksError(f"adapter {spec!r}: module {module.module!r} has no lora_{missing[0]} tensor")
        module.rank = int(_pattern_value(config.get("rank_pattern") or {}, module.module, config.get("r", 8)))
        module.alpha = _pattern_value(config.get("alpha_pattern") or {}, module.module, config.get("lora_alpha", 8))
        module.scaling = module.alpha / math.sqrt(module.rank) if use_rslora else module.alpha / module.rank

    base_names = set(base.specs)
    if config.get("use_dora") is False and any("magnitude" in m.tensors for m in modules.values()):
        raise MergeHooksError(f"adapter {spec!r} has DoRA magnitudes but use_dora is false in its config")
    wanted = [m.module + ".weight" for m in modules.values()] + list(plain)
    if not wanted:
        raise MergeHooksError(f"adapter {spec!r} holds no LoRA tensors")
    to_base = _name_mapper(wanted, base_names)

    adapter = Adapter(spec=spec, path=path, config=config, reader=reader, modules={}, biases={}, replaced={})
    for name, key in plain.items():
        target = to_base(name)
        if target not in base_names:
            raise MergeHooksError(
                f"adapter {spec!r} replaces {name!r} (modules_to_save), which model {base_spec!r} does not have: "
                "is it the adapter's base model?"
            )
        adapter.replaced[target] = key
    for module in modules.values():
        target = to_base(module.module + ".weight")
        if target not in base_names:
            raise MergeHooksError(
                f"adapter {spec!r} targets module {module.module!r}, which model {base_spec!r} does not have: "
                "is it the adapter's base model?"
            )
        adapter.modules[target] = module
        if "bias" in module.tensors:
            bias = target.removesuffix(".weight") + ".bias"
            if bias not in base_names:
                raise MergeHooksError(
                    f"adapter {spec!r} trains a bias for {module.module!r}, which has none in {base_spec!r}"
                )
            adapter.biases[bias] = module

    adapter.embedding_file = _embedding_file(Path(spec).expanduser(), path)
    adapter.tokenizer_folder = _tokenizer_folder(Path(spec).expanduser(), path)
    return adapter


def check_shapes(adapter: Adapter, specs: dict[str, TensorSpec], *, base_spec: str) -> None:
    """Every module's A and B fit the (possibly resized) base tensor and each other; replacements fit too."""
    reader_specs = {s.name: s for s in adapter.reader.specs}
    for target, module in adapter.modules.items():
        shape = specs[target].shape
        a, b = reader_specs[module.tensors["A"]].shape, reader_specs[module.tensors["B"]].shape
        where = f"adapter {adapter.spec!r}, module {module.module!r}"
        if len(shape) != 2 or len(a) != 2 or len(b) != 2:
            raise MergeHooksError(f"{where}: only 2-d weights (linear and embedding layers) are merged, got {list(shape)}")
        if a[0] != b[1]:
            raise MergeHooksError(f"{where}: rank mismatch between lora_A {list(a)} and lora_B {list(b)}")
        if a[0] != module.rank:
            raise MergeHooksError(f"{where}: lora_A has rank {a[0]}, its config says r={module.rank}")
        # B @ A is (out, in); embeddings and fan_in_fan_out (Conv1D) weights store its transpose.
        transposed = module.embedding or adapter.fan_in_fan_out
        expected = (a[1], b[0]) if transposed else (b[0], a[1])
        if tuple(shape) != expected:
            raise MergeHooksError(
                f"{where}: shape mismatch, the adapter makes {list(expected)} but {target!r} of {base_spec!r} is "
                f"{list(shape)}: is it the adapter's base model?"
            )
        if "magnitude" in module.tensors:
            size = reader_specs[module.tensors["magnitude"]].shape
            if size != (b[0],):
                raise MergeHooksError(f"{where}: DoRA magnitude of shape {list(size)} does not fit {list(shape)}")
    for target, key in adapter.replaced.items():
        if reader_specs[key].shape != specs[target].shape:
            raise MergeHooksError(
                f"adapter {adapter.spec!r}: {key!r} has shape {list(reader_specs[key].shape)}, "
                f"{target!r} of {base_spec!r} has {list(specs[target].shape)}"
            )


def _embedding_file(given: Path, found: Path) -> Optional[Path]:
    # FlagEmbedding's save_merged_model reads emb.pth from the output folder, not from the checkpoint.
    for folder in (given, found):
        if (folder / EMBEDDING_FILE).is_file():
            return confined(folder, EMBEDDING_FILE.as_posix(), what="resized embedding")
    return None


def _tokenizer_folder(given: Path, found: Path) -> Optional[Path]:
    from .sidecar import TOKENIZER_FILES

    for folder in (given, found):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None


def read_embedding(path: Path) -> "torch.Tensor":
    """The weight of FlagEmbedding's ``embedding/emb.pth``, a pickled ``torch.nn.Embedding``.

    Read with ``torch.load(weights_only=True)``, allowing ``nn.Embedding`` and nothing else: a file that
    pickles any other object is refused without running it.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([torch.nn.Embedding]):
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeHooksError(f"{path} is not a saved torch.nn.Embedding (only that is accepted): {message}") from None
    if type(loaded) is not torch.nn.Embedding:  # a subclass would also pass isinstance
        raise MergeHooksError(f"{path} holds a {type(loaded).__name__}; only a torch.nn.Embedding is accepted")
    return loaded.weight.detach()


def embedding_name(names: set[str] | list[str]) -> Optional[str]:
    """The input embedding's tensor name in a decoder checkpoint."""
    for name in names:
        if name.endswith(EMBEDDING_SUFFIXES):
            return name
    return None


class AdaptedCheckpoint:
    """A base :class:`~merge_hooks.checkpoint.Checkpoint` seen through its adapters, one tensor at a time.

    Offers what the stream engine reads (``specs``, ``get``, ``dtype``); ``format`` is ``"adapted"``, so the
    engine takes its torch path. Floating tensors come in ``load_dtype`` (their stored dtype when None),
    the dtype the base would be loaded in before peft merges.

    Example:
        >>> ckpt = AdaptedCheckpoint(Checkpoint("./base"), [read_adapter("./lora", ...)], load_dtype=None)
        >>> q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    """

    format = "adapted"

    def __init__(self, base: Checkpoint, adapters: list[Adapter], *, load_dtype: Optional[DType]):
        self.base = base
        self.folder = base.folder
        self.adapters = adapters
        self.load_dtype = load_dtype
        self.embedding_name: Optional[str] = None
        self._whole: Optional[tuple[str, "torch.Tensor"]] = None
        self.resized_vocab: Optional[int] = None
        specs = {name: TensorSpec(name, self._dtype(spec.dtype), spec.shape) for name, spec in base.specs.items()}
        for adapter in adapters:
            # As FlagEmbedding does: each adapter's emb.pth becomes the input embedding before that adapter merges.
            if adapter.embedding_file is not None:
                self._resize(specs, adapter.embedding_file)
            check_shapes(adapter, specs, base_spec=str(base.folder))
        if self.resized_vocab is not None and LM_HEAD in specs and specs[LM_HEAD].shape[0] != self.resized_vocab:
            logger.warning(
                "the vocabulary grows to %d tokens; the untied %s gets zero rows for the new ones (embedders do not "
                "use it)", self.resized_vocab, LM_HEAD,
            )
            specs[LM_HEAD] = TensorSpec(LM_HEAD, specs[LM_HEAD].dtype, (self.resized_vocab, *specs[LM_HEAD].shape[1:]))
        self.specs = specs

    def _resize(self, specs: dict[str, TensorSpec], path: Path) -> None:
        name = embedding_name(list(specs))
        if name is None:
            raise MergeHooksError(f"{path} resizes the input embedding, but {self.base.folder} has no embedding tensor")
        weight = read_embedding(path)
        old = specs[name].shape
        if weight.ndim != 2 or weight.shape[1] != old[1]:
            raise MergeHooksError(
                f"{path} holds an embedding of shape {list(weight.shape)}; the base's {name!r} is {list(old)}"
            )
        self.embedding_name = name
        self.resized_vocab = int(weight.shape[0])
        specs[name] = TensorSpec(name, specs[name].dtype, tuple(weight.shape))

    def _dtype(self, stored: DType) -> DType:
        return self.load_dtype if (self.load_dtype is not None and stored.is_floating_point) else stored

    def get(
        self, name: str, *, out: Optional["torch.Tensor"] = None, rows: Optional[tuple[int, int]] = None
    ) -> "torch.Tensor":
        """Tensor ``name`` (or its ``rows=(start, stop)``) of the base with every adapter merged, in
        ``specs[name].dtype``."""
        spec = self.specs[name]
        # A LoRA delta (one product, as peft computes it) and an emb.pth (one pickle, read whole) replacing the
        # embedding: merged whole once, and kept while its blocks are asked for.
        if rows is not None and (name == self.embedding_name or any(a.needs_whole(name) for a in self.adapters)):
            if self._whole is None or self._whole[0] != name:
                self._whole = None
                self._whole = (name, self.get(name))
            tensor = self._whole[1][rows[0]:rows[1]]
            return tensor.clone() if out is None else out.copy_(tensor)
        self._whole = None
        tensor = self._base_rows(name, rows)
        for adapter in self.adapters:
            if name == self.embedding_name and adapter.embedding_file is not None:
                tensor = read_embedding(adapter.embedding_file).to(spec.dtype.torch)
            tensor = adapter.apply(name, tensor, rows=rows)
        if out is None:
            return tensor
        return out.copy_(tensor)

    def _base_rows(self, name: str, rows: Optional[tuple[int, int]]) -> "torch.Tensor":
        import torch

        spec = self.specs[name]
        base_rows = self.base.specs[name].shape[0] if spec.shape else None
        if name != LM_HEAD or base_rows is None or spec.shape[0] == base_rows:
            return self.base.get(name, rows=rows).to(spec.dtype.torch)
        # The untied lm_head of a resized vocabulary: zero rows for the added tokens.
        start, stop = rows or (0, spec.shape[0])
        tensor = self.base.get(name, rows=(min(start, base_rows), min(stop, base_rows))).to(spec.dtype.torch)
        pad = torch.zeros((stop - start - tensor.shape[0], *spec.shape[1:]), dtype=tensor.dtype)
        return torch.cat([tensor, pad])

    def get_array(self, name: str, *, out=None):
        raise TypeError(f"{self.folder} is merged with adapters, which is computed on torch tensors only")

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def __iter__(self):
        return iter(self.specs)

    @property
    def dtype(self) -> Optional[DType]:
        return self.base.dtype

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def close(self) -> None:
        self.base.close()
        for adapter in self.adapters:
            adapter.close()


def check_base_identity(adapter: Adapter, base: Checkpoint, *, base_spec: str, allow_mismatch: bool) -> None:
    """The adapter's recorded ``base_model_name_or_path``, when it can be found, holds the same weights as
    ``base`` (compared by content, so a copied folder is the same base).

    Same names and shapes are not enough: an adapter trained on an instruction-tuned model loads into its
    pretrained parent without complaint and loses its accuracy there.
    """
    recorded = adapter.config.get("base_model_name_or_path")
    if not recorded:
        logger.warning("adapter %s does not record its base model; cannot check that %s is it", adapter.spec, base_spec)
        return
    folder = _resolve_recorded_base(recorded, adapter.path)
    if folder is None:
        logger.warning(
            "adapter %s was trained on %s, which is not available locally; cannot check that %s is the same model",
            adapter.spec, recorded, base_spec,
        )
        return
    if folder.resolve() == base.folder.resolve():
        return
    try:
        recorded_ckpt = Checkpoint(folder)
    except MergeHooksError as exc:
        logger.warning("adapter %s: cannot read its recorded base %s (%s); not checked", adapter.spec, folder, exc)
        return
    with recorded_ckpt:
        difference = _first_difference(recorded_ckpt, base, sample=[*adapter.modules, *adapter.replaced])
    if difference is None:
        return
    message = (
        f"adapter {adapter.spec!r} was trained on {recorded!r} ({folder}), whose weights differ from model "
        f"{base_spec!r} ({difference})"
    )
    if allow_mismatch:
        logger.warning("%s; merging anyway (allow_base_mismatch)", message)
        return
    raise MergeHooksError(f"{message}: give the adapter's own base, or set allow_base_mismatch: true on the model entry")


def _resolve_recorded_base(recorded: str, adapter_folder: Path) -> Optional[Path]:
    for candidate in (Path(recorded).expanduser(), adapter_folder / recorded):
        if (candidate / "config.json").is_file():
            return candidate
    if recorded.startswith((".", "/", "~")) or recorded.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(recorded, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (the hub raises several kinds): nothing to compare
        return None


def _first_difference(a: Checkpoint, b: Checkpoint, *, sample: list[str]) -> Optional[str]:
    import torch

    if set(a.specs) != set(b.specs):
        name = sorted(set(a.specs) ^ set(b.specs))[0]
        return f"tensor {name!r} is in only one of them"
    for name, spec in a.specs.items():
        if (spec.dtype, spec.shape) != (b.specs[name].dtype, b.specs[name].shape):
            return f"tensor {name!r} is {spec.dtype} {list(spec.shape)} vs {b.specs[name].dtype} {list(b.specs[name].shape)}"
    names = list(dict.fromkeys([n for n in sample if n in a.specs][:4] + sorted(a.specs)[:2]))
    for name in names:
        x, y = a.get(name), b.get(name)
        if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            return f"tensor {name!r} differs"
    return None


@dataclass(frozen=True)
class AdapterRequest:
    """The adapters of one model entry and how to merge them (see :func:`adapter_requests`)."""

    folders: tuple[str, ...] = ()
    allow_base_mismatch: bool = False
    load_dtype: Optional[DType] = None

    def attach(self, base: Checkpoint, *, base_spec: str) -> "AdaptedCheckpoint":
        return attach_adapters(
            base, list(self.folders), base_spec=base_spec,
            allow_base_mismatch=self.allow_base_mismatch, load_dtype=self.load_dtype,
        )


def check_quantized(config: dict, spec: str) -> None:
    """Adapters are merged into full-precision bases only (peft dequantizes, merges and quantizes again)."""
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "quantized")
        raise MergeHooksError(
            f"model {spec!r} is a {method} quantized model; adapters are merged into unquantized bases only"
        )


def attach_requests(models: list[Any], requests: list[AdapterRequest]) -> None:
    """Put each model's adapters in front of its checkpoint (``models`` are preflight's ``InputModel``s)."""
    for model, request in zip(models, requests):
        if request.folders:
            check_quantized(model.config, model.spec)
            model.checkpoint = request.attach(model.checkpoint, base_spec=model.spec)


def adapter_requests(recipe: "Recipe") -> Optional[list[AdapterRequest]]:
    """One :class:`AdapterRequest` per model of ``recipe``, or None when no model has an adapter.

    The base is merged in the output dtype, or in each tensor's stored dtype with ``dtype: keep``.

    Example:
        >>> models = load_inputs(recipe.model_paths, trust_remote_code=False, adapters=adapter_requests(recipe))
    """
    if not any(m.adapters for m in recipe.models):
        return None
    load_dtype = None if recipe.output.dtype == "keep" else dtypes.of(recipe.output.dtype)
    return [AdapterRequest(tuple(m.adapters), bool(m.allow_base_mismatch), load_dtype) for m in recipe.models]


def adapted_names(models: list[Any], names: dict[str, str], *, per_model: int = 4) -> list[str]:
    """A few tensors (folder name -> merged name in ``names``) that adapters change, for ``verify --against``."""
    chosen: list[str] = []
    by_source = {source: name for name, source in names.items()}
    for model in models:
        if isinstance(model.checkpoint, AdaptedCheckpoint):
            changed = [n for a in model.checkpoint.adapters for n in (*a.modules, *a.replaced)]
            chosen += [by_source[n] for n in sorted(set(changed))[:per_model] if n in by_source]
    return list(dict.fromkeys(chosen))


def adapter_folders(models: list[Any]) -> list[Path]:
    """Every adapter folder the models read (an output must not replace one)."""
    return [
        folder
        for m in models if isinstance(m.checkpoint, AdaptedCheckpoint)
        for a in m.checkpoint.adapters for folder in (Path(a.spec).expanduser(), a.path)
    ]


def adapter_provenance(models: list[Any]) -> list[list[dict]]:
    """Per input model, the :meth:`Adapter.describe` of each of its adapters (empty lists when none)."""
    return [
        [a.describe() for a in m.checkpoint.adapters] if isinstance(m.checkpoint, AdaptedCheckpoint) else []
        for m in models
    ]


def attach_adapters(
    base: Checkpoint,
    adapter_specs: list[str],
    *,
    base_spec: str,
    allow_base_mismatch: bool,
    load_dtype: Optional[DType],
) -> AdaptedCheckpoint:
    """Read ``adapter_specs`` (in order), check them against ``base`` and return the merged view.

    Example:
        >>> ckpt = attach_adapters(Checkpoint("./base"), ["./lora"], base_spec="./base",
        ...                        allow_base_mismatch=False, load_dtype=None)
    """
    adapters: list[Adapter] = []
    try:
        for spec in adapter_specs:
            adapter = read_adapter(spec, base, base_spec=base_spec)
            adapters.append(adapter)
            if not adapters[:-1]:
                check_base_identity(adapter, base, base_spec=base_spec, allow_mismatch=allow_base_mismatch)
        return AdaptedCheckpoint(base, adapters, load_dtype=load_dtype)
    except BaseException:
        for adapter in adapters:
            adapter.close()
        raise


def write_adapter_sidecars(checkpoint: Any, directory: Path) -> None:
    """For a first model merged with adapters: the last adapter folder's tokenizer (FlagEmbedding saves the
    tokenizer with its added tokens there) and, when ``emb.pth`` resized the vocabulary, ``vocab_size``."""
    import shutil

    from .sidecar import TOKENIZER_FILES

    if not isinstance(checkpoint, AdaptedCheckpoint):
        return
    folder = next((a.tokenizer_folder for a in reversed(checkpoint.adapters) if a.tokenizer_folder), None)
    if folder is not None:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                (directory / name).unlink()
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(confined(folder, name, what="tokenizer file"), directory / name)
    if checkpoint.resized_vocab is not None:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["vocab_size"] = checkpoint.resized_vocab
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
