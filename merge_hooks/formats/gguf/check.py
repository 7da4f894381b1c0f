"""Read written GGUF files back: the structural check ``verify`` runs, and the agreement check
that runs a file in llama.cpp (llama-cpp-python) beside transformers on the same weights.

The agreement check is what ``tests/test_gguf.py`` asserts on; it lives here so a user can run the
same comparison on their own merge (``llama-cpp-python`` must be installed; it is not a dependency).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

#: Sentences exercising what tokenizers disagree on: accents, digits, punctuation, unknown words, CJK.
SENTENCES = (
    "The capital of France is Paris.",
    "Café, naïve résumé and façade carry accents!",
    "In 2024, 3 models were merged 12 times (weights 0.25 and 1.5).",
    "Zyxqv blorfing quuxes wibble: unknown words?",
    "北京是中国的首都。",
    "Über die Brücke gehen wir heute Abend nach Hause.",
    "search query",
)
PAIRS = (
    ("what is the capital of France?", "Paris is the capital of France."),
    ("what is the capital of France?", "The quick brown fox jumps over the lazy dog."),
    ("how are models merged?", "A merged model keeps the strengths of each fine-tuned model."),
    ("北京是哪里?", "北京是中国的首都。"),
)


def gguf_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.gguf"))


def check_gguf_folder(folder: Path) -> Optional[tuple[list[str], list[str]]]:
    """``(passed, problems)`` for the GGUF files in ``folder``, or None when it holds none.

    Reads every header, the metadata and every tensor's data; checks split files are complete and
    that each tensor's data has the size its type and shape need.

    Example:
        >>> passed, problems = check_gguf_folder(Path("merged"))
    """
    files = gguf_files(folder)
    if not files:
        return None
    from gguf import GGUFReader, quant_shape_to_byte_shape

    passed: list[str] = []
    problems: list[str] = []
    tensors = 0
    declared_total = None
    for path in files:
        try:
            reader = GGUFReader(path)
        except Exception as exc:  # gguf-py raises ValueError, struct and numpy errors on damaged files
            problems.append(f"{path.name}: not a readable GGUF file ({exc})")
            continue
        split_count = reader.get_field("split.count")
        if split_count is not None:
            expected = int(split_count.contents())
            if len(files) != expected:
                problems.append(f"{path.name}: one of {expected} split files, {len(files)} present")
            declared_total = int(reader.get_field("split.tensors.count").contents())
        elif reader.get_field("general.architecture") is None:
            problems.append(f"{path.name}: no general.architecture key")
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            expected_bytes = 1
            for d in quant_shape_to_byte_shape(shape, tensor.tensor_type):
                expected_bytes *= d
            if int(tensor.n_bytes) != expected_bytes or tensor.data.nbytes != expected_bytes:
                problems.append(f"{path.name}: tensor {tensor.name} holds {tensor.data.nbytes} bytes, "
                                f"{expected_bytes} expected for {tensor.tensor_type.name} {shape}")
            tensors += 1
        passed.append(f"{path.name}: {len(reader.tensors)} tensors readable, {len(reader.fields)} metadata keys")
    if declared_total is not None and declared_total != tensors:
        problems.append(f"the split files hold {tensors} tensors, {declared_total} declared")
    if not problems:
        problems += _against_config(folder, files[0])
    return passed, problems


def _against_config(folder: Path, first: Path) -> list[str]:
    """The GGUF's sizes against the model's own config.json (written beside it)."""
    import json

    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return []
    config = json.loads(config_path.read_text(encoding="utf-8"))
    metadata = read_metadata(first)
    arch = metadata.get("general.architecture")
    expected = {"block_count": config.get("num_hidden_layers"), "embedding_length": config.get("hidden_size")}
    return [
        f"{first.name}: {arch}.{key} is {metadata.get(f'{arch}.{key}')}, config.json says {value}"
        for key, value in expected.items()
        if value is not None and metadata.get(f"{arch}.{key}") != value
    ]


def read_metadata(path: Path) -> dict:
    """The metadata of a GGUF file as plain Python values (arrays shortened to their length)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    values = {}
    for name, field_ in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field_.types and field_.types[0] == GGUFValueType.ARRAY:
            values[name] = len(field_.data)
        else:
            values[name] = field_.contents()
    return values


@dataclass
class Agreement:
    """How a GGUF file in llama.cpp compares with transformers on the same weights."""

    token_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    centered_cosines: list[float] = field(default_factory=list)
    scores_gguf: list[float] = field(default_factory=list)
    scores_hf: list[float] = field(default_factory=list)

    @property
    def min_cosine(self) -> float:
        return min(self.cosines) if self.cosines else float("nan")

    @property
    def max_score_diff(self) -> float:
        return max((abs(a - b) for a, b in zip(self.scores_gguf, self.scores_hf)), default=float("nan"))


def _llama_run(llm, ids: Sequence[int], n: int) -> list[float]:
    """llama.cpp's pooled output for one token sequence (llama-cpp-python's ``embed`` takes text only)."""
    import llama_cpp

    llm._batch.reset()
    llm._batch.add_sequence(list(ids), 0, True)
    llm._ctx.kv_cache_clear()
    llm._ctx.decode(llm._batch)
    pointer = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
    return [float(pointer[i]) for i in range(n)]


def load_llama(path: Path, **options):
    """``llama_cpp.Llama(path, **options)`` with llama.cpp's weight repacking off (``--no-repack``).

    On CPUs with AMX, llama.cpp's repacked Q8_0 path (vendored in llama-cpp-python 0.3.36) crashes in
    ``llama_decode`` on files its own quantizer writes as well as on ours; the weights and results are
    the same without it. llama-cpp-python has no argument for it, so its default model parameters are
    wrapped while the model loads.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), **options)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def _cos(a, b) -> float:
    import numpy as np

    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare_with_transformers(
    gguf_path: Path,
    model_dir: Path,
    *,
    sentences: Sequence[str] = SENTENCES,
    pairs: Sequence[tuple[str, str]] = PAIRS,
) -> Agreement:
    """Run ``gguf_path`` in llama.cpp and ``model_dir`` in transformers (float32) on the same inputs.

    Embedders compare pooled embeddings (the pooling the GGUF declares); rerankers compare the
    scores of ``pairs``. Token ids are compared for every sentence.

    Example:
        >>> agreement = compare_with_transformers(Path("merged/merged-F16.gguf"), Path("merged"))
        >>> agreement.min_cosine > 0.999
        True
    """
    import numpy as np
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from .families import POOLING_CLS, POOLING_LAST, POOLING_MEAN, POOLING_RANK

    metadata = read_metadata(gguf_path)
    arch = metadata["general.architecture"]
    pooling = int(metadata.get(f"{arch}.pooling_type", 0))
    context = int(metadata.get(f"{arch}.context_length", 512))
    llm = load_llama(gguf_path, embedding=True, n_ctx=min(context, 512), n_batch=min(context, 512),
                     pooling_type=pooling, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = Agreement()
    try:
        ids_by_sentence = []
        for sentence in sentences:
            ours = llm.tokenize(sentence.encode("utf-8"), add_bos=True, special=False)
            theirs = tokenizer(sentence)["input_ids"]
            ids_by_sentence.append(theirs)
            if ours != theirs:
                result.token_mismatches.append((sentence, ours, theirs))
        if pooling == POOLING_RANK:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir).float().eval()
            for query, document in pairs:
                # What a cross-encoder gets from its tokenizer, token types included (BERT gives the document 1s).
                encoded = tokenizer(query, document, return_tensors="pt")
                result.scores_gguf.append(_llama_run(llm, encoded["input_ids"][0].tolist(), 1)[0])
                with torch.no_grad():
                    result.scores_hf.append(float(model(**encoded).logits[0, 0]))
            return result
        model = AutoModel.from_pretrained(model_dir).float().eval()
        ours_all, theirs_all = [], []
        for ids in ids_by_sentence:
            ours_all.append(np.array(_llama_run(llm, ids, llm.n_embd())))
            with torch.no_grad():
                hidden = model(torch.tensor([ids])).last_hidden_state[0]
            if pooling == POOLING_MEAN:
                pooled = hidden.mean(0)
            elif pooling == POOLING_CLS:
                pooled = hidden[0]
            elif pooling == POOLING_LAST:
                pooled = hidden[-1]
            else:
                raise ValueError(f"{gguf_path}: pooling type {pooling} cannot be compared")
            theirs_all.append(pooled.numpy())
        result.cosines = [_cos(a, b) for a, b in zip(ours_all, theirs_all)]
        # Tiny random models give similar vectors for every input; the centred comparison shows whether
        # the differences between inputs agree too.
        ours_mean, theirs_mean = np.mean(ours_all, 0), np.mean(theirs_all, 0)
        result.centered_cosines = [_cos(a - ours_mean, b - theirs_mean) for a, b in zip(ours_all, theirs_all)]
        return result
    finally:
        llm.close()
