"""The gguf format: merged models written as GGUF run in llama.cpp like they run in transformers.

Every family is merged from two tiny models with real tokenizers (``gguf_builders``) into
``[safetensors, gguf]`` in one run; llama.cpp (llama-cpp-python) loads the GGUF and
:func:`merge_hooks.formats.gguf.check.compare_with_transformers` compares token ids, embeddings and
reranker scores with transformers on the safetensors written beside it: the same merged weights.
Tests that run llama.cpp are skipped only where ``llama_cpp`` cannot be imported.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gguf_builders import build_gguf_model
from helpers import leftovers
from merge_hooks.cli import main
from merge_hooks.errors import MergeHooksError
from merge_hooks.pipeline import run_recipe
from merge_hooks.recipe import recipe_from_dict

gguf = pytest.importorskip("gguf")

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable")

MODEL_TYPES = {"bert": "encoder", "xlmr": "encoder", "xlmr-reranker": "reranker", "llama": "decoder",
               "qwen2": "decoder", "gemma2": "decoder", "bert-reranker": "reranker"}
POOLING = {"bert": "cls"}
THRESHOLD = {"f32": 0.999, "f16": 0.999, "bf16": 0.999, "q8_0": 0.99}
# Q8_0 rounds the tiny reranker's head (widened so scores spread) by up to ~0.04 in the logit (measured; the
# bytes are llama.cpp's own, see test_q8_0_bytes_match_llama_cpp_quantizer).
SCORE_TOLERANCE = {"f32": 1e-2, "f16": 1e-2, "q8_0": 5e-2}


@pytest.fixture(scope="session")
def gguf_inputs(tmp_path_factory):
    """Factory: ``gguf_inputs("xlmr")`` -> two tiny model folders (seeds 0 and 1), built once."""
    root = tmp_path_factory.mktemp("gguf-models")
    built: dict[str, list[Path]] = {}

    def make(family: str) -> list[Path]:
        if family not in built:
            built[family] = [build_gguf_model(family, root / family / f"seed{seed}", seed=seed,
                                              pooling=POOLING.get(family)) for seed in (0, 1)]
        return built[family]

    return make


def merge_to(paths, output: Path, model_type: str, *, save_format, engine="auto", **output_options):
    recipe = recipe_from_dict({
        "model_type": model_type,
        "engine": engine,
        "models": [{"path": str(p), "weight": w} for p, w in zip(paths, (0.6, 0.4))],
        "output": {"path": str(output), "save_format": save_format, **output_options},
    })
    return run_recipe(recipe, quiet=True)


@pytest.fixture(scope="session")
def merged(gguf_inputs, tmp_path_factory):
    """Factory: ``merged("xlmr", "q8_0")`` -> a folder with model.safetensors and merged-Q8_0.gguf."""
    root = tmp_path_factory.mktemp("gguf-merged")
    done: dict[tuple[str, str], Path] = {}

    def make(family: str, gguf_type: str) -> Path:
        if (family, gguf_type) not in done:
            output = root / f"{family}-{gguf_type}" / "merged"
            merge_to(gguf_inputs(family), output, MODEL_TYPES[family], save_format=["safetensors", "gguf"],
                     gguf_type=gguf_type)
            done[family, gguf_type] = output
        return done[family, gguf_type]

    return make


def the_gguf(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    assert len(files) == 1, files
    return files[0]


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


# --- llama.cpp agrees with transformers -------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "f32"])
@pytest.mark.parametrize("family", ["bert", "xlmr", "llama", "qwen2", "gemma2"])
def test_embedders_agree_with_transformers(merged, family, gguf_type):
    from merge_hooks.formats.gguf.check import compare_with_transformers

    folder = merged(family, gguf_type)
    path = the_gguf(folder)
    assert path.name == f"merged-{gguf_type.upper()}.gguf"
    agreement = compare_with_transformers(path, folder)
    assert agreement.token_mismatches == []
    assert len(agreement.cosines) >= 7
    assert agreement.min_cosine >= THRESHOLD[gguf_type], agreement.cosines
    # Tiny models give similar vectors for every input: the differences between inputs must agree as well.
    assert min(agreement.centered_cosines) >= THRESHOLD[gguf_type] - 0.01, agreement.centered_cosines


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "f32"])
def test_xlmr_reranker_ranks_like_transformers(merged, gguf_type):
    from merge_hooks.formats.gguf.check import compare_with_transformers
    from merge_hooks.formats.gguf.check import read_metadata

    folder = merged("xlmr-reranker", gguf_type)
    path = the_gguf(folder)
    assert read_metadata(path)["bert.pooling_type"] == 4  # RANK: llama.cpp ranks without --reranking
    agreement = compare_with_transformers(path, folder)
    assert agreement.token_mismatches == []
    assert len(agreement.scores_hf) == 4
    tolerance = SCORE_TOLERANCE[gguf_type]
    assert agreement.max_score_diff <= tolerance, (agreement.scores_gguf, agreement.scores_hf)
    # Same order for every two pairs transformers tells apart by more than the tolerance, and there are such pairs.
    ours, theirs = agreement.scores_gguf, agreement.scores_hf
    ordered = [(i, j) for i in range(len(theirs)) for j in range(len(theirs)) if theirs[i] - theirs[j] > 2 * tolerance]
    assert len(ordered) >= 3, theirs
    assert all(ours[i] > ours[j] for i, j in ordered)


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_real_minilm_converts_and_agrees(minilm_path, tmp_path, gguf_type):
    from merge_hooks.convert import convert
    from merge_hooks.formats.gguf.check import compare_with_transformers, read_metadata

    convert(minilm_path, tmp_path / "minilm", save_format="gguf", gguf_type=gguf_type, quiet=True)
    path = tmp_path / "minilm" / f"minilm-{gguf_type.upper()}.gguf"
    assert read_metadata(path)["bert.pooling_type"] == 1  # mean, from 1_Pooling/config.json
    assert not list((tmp_path / "minilm").glob("*.safetensors"))
    agreement = compare_with_transformers(path, minilm_path)
    assert agreement.token_mismatches == []
    assert agreement.min_cosine >= THRESHOLD[gguf_type], agreement.cosines
    assert min(agreement.centered_cosines) >= THRESHOLD[gguf_type] - 0.01


@needs_llama_cpp
def test_real_minilm_sentence_transformers_agrees(minilm_path, tmp_path):
    """llama.cpp's mean-pooled embeddings are what sentence-transformers gives for all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    from merge_hooks.convert import convert
    from merge_hooks.formats.gguf.check import SENTENCES

    from merge_hooks.formats.gguf.check import load_llama

    convert(minilm_path, tmp_path / "minilm", save_format="gguf", quiet=True)
    llm = load_llama(tmp_path / "minilm" / "minilm-F16.gguf", embedding=True, verbose=False)
    try:
        ours = np.array(llm.embed(list(SENTENCES), normalize=True))
    finally:
        llm.close()
    theirs = SentenceTransformer(str(minilm_path), device="cpu").encode(list(SENTENCES), normalize_embeddings=True)
    assert np.min(np.sum(ours * theirs, axis=1)) >= 0.999


@needs_llama_cpp
def test_q8_0_bytes_match_llama_cpp_quantizer(merged, tmp_path):
    """Our Q8_0 tensors are byte for byte what llama.cpp's own quantizer makes from the F32 file."""
    ours = {t.name: t for t in gguf.GGUFReader(the_gguf(merged("llama", "q8_0"))).tensors}
    requantized = tmp_path / "requantized.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    status = llama_cpp.llama_model_quantize(str(the_gguf(merged("llama", "f32"))).encode(),
                                            str(requantized).encode(), ctypes.byref(params))
    assert status == 0
    compared = 0
    for tensor in gguf.GGUFReader(requantized).tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        assert ours[tensor.name].tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
        assert bytes(ours[tensor.name].data) == bytes(tensor.data), tensor.name
        compared += 1
    assert compared >= 14  # every attention and MLP matrix of both blocks, plus embeddings


# --- what is written --------------------------------------------------------------------------------------


def test_tensor_types_follow_llama_cpp_rules(merged):
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(the_gguf(merged("bert", "q8_0"))).tensors}
    assert types["position_embd.weight"] == Q.F32
    assert types["token_types.weight"] == Q.F32
    assert types["token_embd_norm.weight"] == Q.F32 and types["blk.0.attn_q.bias"] == Q.F32
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q8_0
    metadata = json.loads(json.dumps(_metadata(merged("bert", "q8_0")), default=str))
    assert metadata["general.file_type"] == 7 and metadata["general.quantization_version"] == 2
    assert metadata["bert.attention.causal"] is False
    assert metadata["bert.pooling_type"] == 2  # CLS, from the sentence-transformers Pooling module


def test_rows_that_do_not_fill_quant_blocks_fall_back_to_f16():
    from merge_hooks.formats.gguf.families import BERT
    from merge_hooks.formats.gguf.writer import _tensor_type

    assert _tensor_type("blk.0.ffn_up.weight", (37, 48), "q8_0", BERT) == gguf.GGMLQuantizationType.F16
    assert _tensor_type("blk.0.ffn_up.weight", (37, 64), "q8_0", BERT) == gguf.GGMLQuantizationType.Q8_0


def _metadata(folder: Path) -> dict:
    from merge_hooks.formats.gguf.check import read_metadata

    return read_metadata(the_gguf(folder))


def test_xlmr_position_table_is_cut_by_pad_token_id_plus_one(merged, gguf_inputs):
    from safetensors.numpy import load_file

    folder = merged("xlmr", "f32")
    config = json.loads((folder / "config.json").read_text())
    offset = config["pad_token_id"] + 1
    tensors = {t.name: t for t in gguf.GGUFReader(the_gguf(folder)).tensors}
    hf = load_file(folder / "model.safetensors")["embeddings.position_embeddings.weight"]
    assert np.array_equal(np.asarray(tensors["position_embd.weight"].data), hf[offset:])
    assert _metadata(folder)["bert.context_length"] == config["max_position_embeddings"] - offset


@pytest.mark.parametrize("family, permuted", [("llama", True), ("qwen2", False)])
def test_q_and_k_permuted_for_llama_only(merged, family, permuted):
    from safetensors.numpy import load_file

    from merge_hooks.formats.gguf.families import PERMUTE_K

    folder = merged(family, "f32")
    config = json.loads((folder / "config.json").read_text())
    hf = load_file(folder / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    written = np.asarray({t.name: t for t in gguf.GGUFReader(the_gguf(folder)).tensors}["blk.0.attn_k.weight"].data)
    assert np.array_equal(written, PERMUTE_K.apply(hf, config) if permuted else hf)
    assert not np.array_equal(written, hf) or not permuted


def test_family_tables_agree_with_gguf_py_tensor_map(gguf_inputs):
    """Each name our tables write is the one gguf-py's TensorNameMap gives for the same Hugging Face name."""
    from merge_hooks.checkpoint import Checkpoint
    from merge_hooks.formats.gguf.families import family_for

    arch_ids = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    for family_name in ("bert", "xlmr", "xlmr-reranker", "llama", "qwen2", "gemma2"):
        folder = gguf_inputs(family_name)[0]
        config = json.loads((folder / "config.json").read_text())
        family = family_for(config)
        tensor_map = gguf.get_tensor_name_map(arch_ids[family.arch], config["num_hidden_layers"])
        with Checkpoint(folder) as checkpoint:
            names = list(checkpoint.specs)
        checked = 0
        for name in names:
            ours, _ = family.map_name(name)
            if ours is None:
                continue
            stripped = next((name[len(p):] for p in family.prefixes if name.startswith(p)), name)
            theirs = tensor_map.get_name(name, try_suffixes=(".weight", ".bias")) or \
                tensor_map.get_name(stripped, try_suffixes=(".weight", ".bias"))
            assert theirs == ours, (family_name, name)
            checked += 1
        assert checked >= 10


@pytest.mark.parametrize("engine", ["stream", "cocktail"])
def test_bf16_weights_default_to_bf16_with_the_same_bits(gguf_inputs, tmp_path, engine):
    from merge_hooks.checkpoint import Checkpoint

    result = merge_to(gguf_inputs("qwen2"), tmp_path / "merged", "decoder", save_format="safetensors,gguf",
                      dtype="bfloat16", engine=engine)
    names = [name for name, _ in result.files]
    assert "merged-BF16.gguf" in names
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "merged" / "merged-BF16.gguf").tensors}
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32}
    with Checkpoint(tmp_path / "merged") as checkpoint:
        bits = checkpoint.get_array("model.layers.1.mlp.up_proj.weight")  # bfloat16 as uint16 bits
    assert bytes(tensors["blk.1.ffn_up.weight"].data) == bits.tobytes()


@needs_llama_cpp
def test_split_files_load_in_llama_cpp(gguf_inputs, tmp_path):
    from merge_hooks.formats.gguf.check import compare_with_transformers

    folder = tmp_path / "merged"
    merge_to(gguf_inputs("llama"), folder, "decoder", save_format=["safetensors", "gguf"], max_shard_size="60KB")
    splits = sorted(folder.glob("*.gguf"))
    assert [p.name for p in splits] == [f"merged-F16-0000{i}-of-0000{len(splits)}.gguf" for i in range(1, len(splits) + 1)]
    assert len(splits) >= 2
    first = gguf.GGUFReader(splits[0])
    assert int(first.get_field("split.count").contents()) == len(splits)
    assert int(first.get_field("split.tensors.count").contents()) == sum(len(gguf.GGUFReader(p).tensors) for p in splits)
    agreement = compare_with_transformers(splits[0], folder)
    assert agreement.min_cosine >= 0.999
    from merge_hooks.verify import verify_folder

    report = verify_folder(folder, loaders=False)
    assert not report.problems and any("match merge_manifest.json (sizes and blake3)" in line for line in report.passed)


def test_bge_m3_heads_stay_beside_the_gguf(make_models, tmp_path):
    folder = tmp_path / "merged"
    result = merge_to(make_models("xlmr-m3", 2), folder, "encoder", save_format="gguf")
    names = [name for name, _ in result.files]
    assert "merged-F16.gguf" in names
    assert "colbert_linear.pt" in names and "sparse_linear.pt" in names
    assert "GGUF cannot hold the sparse and ColBERT heads" in (folder / "README.md").read_text()


def test_verify_reads_every_tensor_and_finds_a_truncated_file(merged, tmp_path):
    from merge_hooks.verify import verify_folder

    folder = tmp_path / "copy"
    shutil.copytree(merged("xlmr", "f16"), folder)
    passed = verify_folder(folder, loaders=False).passed
    assert any(line.startswith("gguf: merged-F16.gguf") for line in passed)
    # The GGUF's digest was taken while it was written (header from gguf-py, data from the stream).
    assert any(line.endswith("match merge_manifest.json (sizes and blake3)") for line in passed), passed
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert any("bert.block_count is 2, config.json says 3" in p for p in verify_folder(folder, loaders=False,
                                                                                      hashes=False).problems)
    (folder / "config.json").write_text(json.dumps(config))
    path = the_gguf(folder)
    path.write_bytes(path.read_bytes()[:-1000])
    report = verify_folder(folder, hashes=False, loaders=False)
    assert any("merged-F16.gguf" in problem for problem in report.problems), report.problems


# --- conversions and streaming: gguf-py's bytes, from row blocks ----------------------------------------------


def _every_16_bit_pattern(dtype) -> np.ndarray:
    """All 65536 patterns, in order and shuffled (Q8_0 blocks then mix magnitudes, zeros, NaNs), and some more."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(0)
    return np.concatenate([bits, rng.permutation(bits), rng.permutation(bits)[:32 * 99]]).view(dtype)


def _around_float16_rounding() -> np.ndarray:
    """float32 values a few ulps either side of every point where float16 rounding changes, and past its range."""
    halves = np.unique(_every_16_bit_pattern(np.float16).astype(np.float32))
    halves = halves[np.isfinite(halves)]
    middles = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    near = (middles.view(np.int32)[:, None] + np.arange(-3, 4, dtype=np.int32)).reshape(-1).view(np.float32)
    edges = np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, -np.inf, np.nan, 2**-24, 3 * 2**-26, 2**-149],
                     np.float32)
    values = np.concatenate([near, -near, halves, edges])
    values = np.concatenate([values, np.zeros(-values.size % 32, np.float32)])
    return np.concatenate([values, np.random.default_rng(1).permutation(values)])


def _q8_0_edges() -> np.ndarray:
    """Blocks whose scaled values land exactly on .5 (roundf's ties), zero blocks, blocks of tiny and huge scale."""
    rng = np.random.default_rng(2)
    ties = (rng.integers(-254, 255, (2048, 32)) / 2).astype(np.float32)
    ties[:, 0] = 127
    ties *= np.exp2(rng.integers(-30, 30, (2048, 1))).astype(np.float32)
    tiny = np.zeros((96, 32), np.float32)
    tiny[::3] = rng.standard_normal((32, 32)).astype(np.float32) * 1e-37
    tiny[1::3, 7] = 1e-45
    weights = rng.standard_normal((4096, 32)).astype(np.float32) * 0.02
    return np.concatenate([ties, tiny, weights]).reshape(-1)


def _gguf_py_bytes(values: np.ndarray, stored: str, qtype: str) -> bytes:
    """What the writer wrote before blocks: widen to float32, then gguf-py's quantize."""
    if stored == "bfloat16":
        wide = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        wide = values.astype(np.float32)
    return gguf.quants.quantize(wide.reshape(-1, 32), gguf.GGMLQuantizationType[qtype]).tobytes()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0"])
@pytest.mark.parametrize("stored, values", [
    ("bfloat16", lambda: _every_16_bit_pattern(np.uint16)),
    ("float16", lambda: _every_16_bit_pattern(np.float16)),
    ("float32", _around_float16_rounding),
    ("float32", _q8_0_edges),
    ("float64", lambda: _q8_0_edges().astype(np.float64) * 1.1),
])
def test_conversions_give_gguf_py_bytes(stored, values, qtype):
    from merge_hooks.formats.gguf.quants import CHUNK, Encoder

    values = values()
    assert values.size > 2 * CHUNK  # several chunks, the last one short
    encoder = Encoder(stored, qtype)
    with np.errstate(all="ignore"):
        ours = b"".join(bytes(piece) for piece in encoder.pieces(values))
        assert ours == _gguf_py_bytes(values, stored, qtype)
        # Scratch arrays carry nothing from one call to the next.
        assert b"".join(bytes(piece) for piece in encoder.pieces(values[: 3 * 32])) == ours[: len(ours) * 3 * 32 // values.size]


@pytest.mark.parametrize("transform_name, shape", [
    ("PERMUTE_Q", (64, 6)), ("PERMUTE_K", (32, 6)), ("CUT_POSITIONS", (20, 3)), ("PLUS_ONE", (40,)),
])
def test_transforms_on_row_blocks_match_whole_tensors(transform_name, shape):
    """Blocks of any size, cut anywhere (through a head, inside the dropped rows), give the whole tensor's result."""
    from merge_hooks.dtypes import float32
    from merge_hooks.formats.gguf import families
    from merge_hooks.formats.gguf.writer import written_rows

    transform = getattr(families, transform_name)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 4}
    tensor = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = transform.apply(tensor, config)
    assert expected.shape == transform.shape(shape, config)
    for sizes in ([shape[0]], [1] * shape[0], [3, 7, 1, 13, 2, 100], [5, 5, 6, 30]):
        cuts = np.cumsum(sizes)
        blocks = [b for b in np.split(tensor, cuts[cuts < shape[0]]) if b.size]
        copies = [b.copy() for b in blocks]
        rows = list(written_rows(iter(blocks), transform, shape=shape, dtype=float32, config=config))
        assert np.array_equal(np.concatenate(rows), expected), sizes
        assert all(np.array_equal(b, c) for b, c in zip(blocks, copies))  # blocks are shared: never modified


def _block_source(folder: Path, block_bytes: int):
    from merge_hooks.checkpoint import Checkpoint
    from merge_hooks.tensors import TensorSource

    checkpoint = Checkpoint(folder)
    return checkpoint, TensorSource(specs=list(checkpoint.specs.values()), get=checkpoint.get_array,
                                    rows=lambda name, start, stop: checkpoint.get_array(name, rows=(start, stop)),
                                    block_bytes=block_bytes)


@pytest.mark.parametrize("family", ["llama", "xlmr", "gemma2"])
@pytest.mark.parametrize("gguf_type", ["q8_0", "f16"])
def test_small_blocks_write_the_same_file_as_whole_tensors(merged, tmp_path, family, gguf_type):
    """Blocks of a few rows (heads split across blocks, position rows cut across blocks) change no byte."""
    from merge_hooks.formats.gguf.writer import write_gguf

    folder = merged(family, gguf_type)
    config = json.loads((folder / "config.json").read_text())
    files = {}
    for name, block_bytes in (("whole", None), ("blocks", 3 * 1024)):
        checkpoint, source = _block_source(folder, block_bytes or 1)
        if block_bytes is None:
            source.rows = None
        (tmp_path / name).mkdir()
        with checkpoint:
            path, = write_gguf(source, tmp_path / name, model_dir=folder, config=config, output_name="x",
                               gguf_type=gguf_type, base_models=["a"])
        files[name] = path
    assert files["blocks"].read_bytes() == files["whole"].read_bytes()
    # The tensors written by the merge itself (blocks of the stream engine's size) are the same too.
    ours = {t.name: bytes(t.data) for t in gguf.GGUFReader(files["blocks"]).tensors}
    theirs = {t.name: bytes(t.data) for t in gguf.GGUFReader(the_gguf(folder)).tensors}
    assert ours == theirs


def test_failures_while_streaming_reach_the_caller(merged, tmp_path, monkeypatch):
    """A block the merge cannot produce, or one the conversion thread cannot write, stops the write with its error."""
    from merge_hooks.formats.gguf import quants
    from merge_hooks.formats.gguf.writer import write_gguf

    folder = merged("llama", "q8_0")
    config = json.loads((folder / "config.json").read_text())
    checkpoint, source = _block_source(folder, 3 * 1024)
    rows = source.rows

    def failing_rows(name, start, stop):
        if name.endswith("layers.1.mlp.up_proj.weight") and start > 0:
            raise RuntimeError("merge failed")
        return rows(name, start, stop)

    with checkpoint:
        source.rows = failing_rows
        with pytest.raises(RuntimeError, match="merge failed"):
            write_gguf(source, tmp_path, model_dir=folder, config=config, output_name="a", gguf_type="q8_0")
        source.rows = rows

        def failing_pieces(self, array):
            raise OSError("no space left on device")

        monkeypatch.setattr(quants.Encoder, "pieces", failing_pieces)
        with pytest.raises(OSError, match="no space left"):
            write_gguf(source, tmp_path, model_dir=folder, config=config, output_name="b", gguf_type="q8_0")


def test_every_merged_model_is_a_base_model(merged, gguf_inputs, tmp_path):
    from merge_hooks.formats import WriteOptions, get_format
    from merge_hooks.formats.gguf import base_model_name

    folder = merged("qwen2", "f16")
    checkpoint, source = _block_source(folder, 8 * 2**20)
    models = ("/models/first", "Qwen/Qwen2-0.5B", "/cache/models--org--third/snapshots/0123abcd")
    with checkpoint:
        path, = get_format("gguf").write(source, tmp_path, WriteOptions(
            0, model_dir=folder, config=json.loads((folder / "config.json").read_text()), output_name="x",
            models=models))
    metadata = _metadata_of(path)
    assert metadata["general.base_model.count"] == 3
    assert [metadata[f"general.base_model.{i}.name"] for i in range(3)] == ["first", "Qwen2-0.5B", "third"]
    assert base_model_name(str(folder)) == folder.name
    # A merge names each of its models.
    inputs = gguf_inputs("qwen2")
    merge_to(inputs, tmp_path / "merged", "decoder", save_format="gguf")
    metadata = _metadata_of(the_gguf(tmp_path / "merged"))
    assert metadata["general.base_model.count"] == len(inputs)
    assert [metadata[f"general.base_model.{i}.name"] for i in range(len(inputs))] == [Path(p).name for p in inputs]


def _metadata_of(path: Path) -> dict:
    from merge_hooks.formats.gguf.check import read_metadata

    return read_metadata(path)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_disk_estimate_is_the_size_of_the_gguf_type(merged, gguf_type):
    from merge_hooks.checkpoint import Checkpoint
    from merge_hooks.formats import PreflightContext, expand_formats, output_size
    from merge_hooks.recipe import OutputOptions
    from merge_hooks.tensors import TensorSpec

    folder = merged("llama", gguf_type)
    config = json.loads((folder / "config.json").read_text())
    with Checkpoint(folder) as checkpoint:
        specs = [TensorSpec(s.name, "bfloat16", s.shape) for s in checkpoint.specs.values()]  # a bfloat16 merge
    context = PreflightContext(model_dir=folder, config=config, model_type="decoder", formats=("safetensors", "gguf"),
                               output=OutputOptions(save_format="safetensors,gguf", gguf_type=gguf_type))
    tensors = sum(s.nbytes for s in specs)
    gguf_size = output_size(expand_formats("gguf"), context, specs)
    assert output_size(expand_formats("safetensors,gguf"), context, specs) == tensors + gguf_size
    # What was written: the same tensor data plus the header (metadata and vocabulary).
    written = the_gguf(folder).stat().st_size
    assert gguf_size < written < gguf_size + 64 * 1024
    ratio = {"f32": 2.0, "f16": 1.0, "q8_0": 34 / 64}[gguf_type]
    assert gguf_size == pytest.approx(ratio * tensors, rel=0.03)


@pytest.fixture(scope="module")
def wide_llamas(tmp_path_factory) -> list[Path]:
    """Two one-layer Llama models whose MLP matrices are 64 MiB each in float32 (64 blocks of 1 MiB), with a
    byte-level BPE tokenizer (as Llama 3's; gguf-py reads a SentencePiece one through transformers, which imports torch)."""
    from safetensors.numpy import save_file

    hidden, intermediate, vocab = 512, 32768, 500
    root = tmp_path_factory.mktemp("wide-llamas")
    paths = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        folder = root / f"model{seed}"
        shutil.copytree(Path(__file__).parent / "data" / "gguf_tokenizers" / "qwen2", folder)
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (vocab, hidden), "model.layers.0.input_layernorm.weight": (hidden,),
                  "model.layers.0.post_attention_layernorm.weight": (hidden,),
                  **{f"model.layers.0.self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"},
                  "model.layers.0.mlp.gate_proj.weight": (intermediate, hidden),
                  "model.layers.0.mlp.up_proj.weight": (intermediate, hidden),
                  "model.layers.0.mlp.down_proj.weight": (hidden, intermediate)}
        save_file({name: rng.standard_normal(shape, dtype=np.float32) * 0.02 for name, shape in shapes.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": 1, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "torch_dtype": "float32"}))
        paths.append(folder)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q8_0", "f16"])
def test_gguf_memory_follows_the_block_size(wide_llamas, tmp_path, gguf_type):
    """Peak memory of a merge to GGUF stays in the stream engine's bound (tests/test_memory.py), although its
    largest tensor is 64 blocks; torch is not imported."""
    from test_memory import BLOCK, BOUND, MiB, merge_memory

    output = tmp_path / "merged"
    used, modules = merge_memory([
        "--model-type", "decoder", "--models", *map(str, wide_llamas), "--weights", "0.6", "0.4", "-o", str(output),
        "--engine", "stream", "--save-format", "gguf", "--gguf-type", gguf_type, "-q",
    ], tmp_path)
    assert "merge_hooks.formats.gguf.writer" in modules and "torch" not in modules
    assert used < BOUND, f"the merge used {used / MiB:.0f} MiB above its import baseline, blocks of {BLOCK / MiB:.0f} MiB"
    tensors = {t.name: t for t in gguf.GGUFReader(the_gguf(output)).tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()]


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------


def _refused(tmp_path, capsys, *args) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path, "merged") == []
    return err


def _recipe(tmp_path, paths, model_type, **output) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model_type": model_type,
        "models": [{"path": str(p), "weight": 0.5} for p in paths],
        "output": {"path": str(tmp_path / "merged"), **output},
    }))
    return path


def test_bert_cross_encoders_are_refused_with_the_reason(gguf_inputs, tmp_path, capsys):
    recipe = _recipe(tmp_path, gguf_inputs("bert-reranker"), "reranker", save_format="gguf")
    err = _refused(tmp_path, capsys, "merge", recipe)
    assert "BertForSequenceClassification" in err and "token-type row 0" in err


def test_unsupported_architecture_names_the_supported_ones(gguf_inputs, tmp_path, capsys):
    models = []
    for i, source in enumerate(gguf_inputs("bert")):
        copy = shutil.copytree(source, tmp_path / f"m{i}")
        config = json.loads((copy / "config.json").read_text())
        config["architectures"] = ["DebertaV2Model"]
        (copy / "config.json").write_text(json.dumps(config))
        models.append(copy)
    err = _refused(tmp_path, capsys, "merge", _recipe(tmp_path, models, "encoder", save_format="gguf"))
    assert "DebertaV2Model" in err and "XLMRobertaModel" in err and "LlamaForCausalLM" in err


def test_tokenizer_that_cannot_be_exported(gguf_inputs, tmp_path, capsys):
    models = []
    for i, source in enumerate(gguf_inputs("xlmr")):
        copy = shutil.copytree(source, tmp_path / f"m{i}")
        (copy / "tokenizer.json").unlink()
        models.append(copy)
    err = _refused(tmp_path, capsys, "merge", _recipe(tmp_path, models, "encoder", save_format="gguf"))
    assert "tokenizer.json" in err


def test_unknown_gguf_type(gguf_inputs, tmp_path, capsys):
    recipe = _recipe(tmp_path, gguf_inputs("bert"), "encoder", save_format="gguf")
    err = _refused(tmp_path, capsys, "merge", recipe, "--gguf-type", "q4_k")
    assert "q4_k" in err and "q8_0" in err


def test_gguf_type_without_gguf_format(gguf_inputs, tmp_path, capsys):
    recipe = _recipe(tmp_path, gguf_inputs("bert"), "encoder")
    err = _refused(tmp_path, capsys, "merge", recipe, "--gguf-type", "q8_0")
    assert "gguf" in err and "save_format" in err


def test_missing_gguf_package_names_the_extra(gguf_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    err = _refused(tmp_path, capsys, "merge", _recipe(tmp_path, gguf_inputs("bert"), "encoder", save_format="gguf"))
    assert "merge-hooks[gguf]" in err


def test_convert_cli_writes_gguf_only(gguf_inputs, tmp_path, capsys):
    assert run_cli("convert", gguf_inputs("xlmr")[0], tmp_path / "out", "--save-format", "gguf",
                   "--gguf-type", "q8_0", "-q") == 0
    assert (tmp_path / "out" / "out-Q8_0.gguf").is_file()
    assert not list((tmp_path / "out").glob("*.safetensors"))
    with pytest.raises(MergeHooksError, match="gguf_type"):
        from merge_hooks.convert import convert

        convert(gguf_inputs("xlmr")[0], tmp_path / "out2", save_format="safetensors", gguf_type="f16")


@needs_llama_cpp
def test_bert_cross_encoder_refusal_is_measured(gguf_inputs, tmp_path, monkeypatch):
    """Why BERT cross-encoders are refused: written as llama.cpp could run them (pooler as ``cls``, classifier as
    ``cls.output``, rank pooling), they score like transformers only once token-type row 1 equals row 0."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from merge_hooks.checkpoint import Checkpoint
    from merge_hooks.formats.gguf import writer
    from merge_hooks.formats.gguf.check import compare_with_transformers
    from merge_hooks.formats.gguf.families import BERT, POOLING_RANK, Rule
    from merge_hooks.tensors import TensorSource

    as_llama_cpp_could = dataclasses.replace(
        BERT, rules=BERT.rules + (Rule("pooler.dense", "cls"), Rule("classifier", "cls.output")),
        drop=tuple(d for d in BERT.drop if d != "pooler.dense"), pooling=POOLING_RANK, _compiled=[])
    monkeypatch.setattr(writer, "family_for", lambda config: as_llama_cpp_could)

    def max_score_diff(folder: Path) -> float:
        config = json.loads((folder / "config.json").read_text())
        with Checkpoint(folder) as checkpoint:
            source = TensorSource(specs=list(checkpoint.specs.values()), get=checkpoint.get_array)
            path, = writer.write_gguf(source, folder, model_dir=folder, config=config, output_name="x", gguf_type="f32")
        return compare_with_transformers(path, folder).max_score_diff

    model = shutil.copytree(gguf_inputs("bert-reranker")[0], tmp_path / "as-is")
    assert max_score_diff(model) > 0.5
    same_rows = shutil.copytree(model, tmp_path / "same-rows", ignore=shutil.ignore_patterns("*.gguf"))
    state_dict = load_file(same_rows / "model.safetensors")
    types = state_dict["bert.embeddings.token_type_embeddings.weight"]
    types[1] = types[0]
    save_file(state_dict, same_rows / "model.safetensors", metadata={"format": "pt"})
    assert max_score_diff(same_rows) < 1e-2
