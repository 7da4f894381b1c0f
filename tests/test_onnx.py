"""The onnx format: files and layout, agreement with PyTorch in ONNX Runtime and in the loaders users
load it with (sentence-transformers' ONNX backend where optimum imports: stack A), bge-m3's three
outputs against FlagEmbedding, external data, the int8 variant, verify, and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, leftovers, merge
from merge_hooks.cli import main
from merge_hooks.errors import MergeHooksError
from merge_hooks.formats.onnx import layout
from merge_hooks.formats.onnx.check import check_onnx, pool
from merge_hooks.verify import verify_folder

onnxruntime = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4
SENTENCES = ["What is the capital of France?", "ok", "Paris is the capital and largest city of France, on the Seine."]
PAIRS = [[SENTENCES[0], SENTENCES[2]], [SENTENCES[0], SENTENCES[1]], [SENTENCES[1], SENTENCES[2]]]
QUANTIZED = "onnx/model_qint8_avx512_vnni.onnx"


def _optimum_error() -> str | None:
    try:
        import optimum.onnxruntime  # noqa: F401
    except Exception as error:  # noqa: BLE001 - on transformers 5 optimum-onnx 0.1.0 fails inside its imports
        return f"{type(error).__name__}: {error}"
    return None


needs_st_onnx_backend = pytest.mark.skipif(
    _optimum_error() is not None,
    reason=f"sentence-transformers' ONNX backend needs optimum-onnx, which does not import here ({_optimum_error()})",
)


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def tokenize(folder, texts, pairs: bool = False) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if pairs:
        batch = tokenizer([a for a, _ in texts], [b for _, b in texts], padding=True, return_tensors="np")
    else:
        batch = tokenizer(texts, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in batch.items()}


def run_onnx(path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})))


def torch_outputs(folder, kind: str, inputs: dict[str, np.ndarray]):
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if kind == "reranker" else AutoModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()})


def assert_graph_signature(path, input_names, output_names) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(input_names)
    assert [o.name for o in graph.output] == list(output_names)
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        batch, sequence = value.type.tensor_type.shape.dim
        assert batch.dim_param and sequence.dim_param, f"{value.name} has a fixed batch or sequence size"


def manifest_names(folder) -> set[str]:
    return set(json.loads((folder / "merge_manifest.json").read_text())["files"])


# --- encoders -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_merges(make_models, tmp_path_factory):
    """The same merge written as safetensors and as onnx (with the int8 variant)."""
    paths = make_models("bert-encoder", 2, pooling="mean")
    root = tmp_path_factory.mktemp("bert")
    torch_only = merge(paths, "encoder", root / "torch", weights=[0.6, 0.4])
    onnx_only = merge(paths, "encoder", root / "onnx", weights=[0.6, 0.4], save_format="onnx", onnx_quantize="qint8")
    return torch_only.output, onnx_only.output


def test_onnx_alone_writes_no_torch_weights(bert_merges):
    _, folder = bert_merges
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["model.onnx", "model_qint8_avx512_vnni.onnx"]
    assert not [p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".bin"}]
    for name in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (folder / name).is_file(), name
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["pooling_mode_cls_token"] is False
    names = manifest_names(folder)
    assert {"onnx/model.onnx", QUANTIZED} <= names and "model.safetensors" not in names


def test_bert_encoder_graph_matches_pytorch(bert_merges):
    torch_folder, onnx_folder = bert_merges
    path = onnx_folder / "onnx" / "model.onnx"
    assert_graph_signature(path, ("input_ids", "token_type_ids", "attention_mask"), ("last_hidden_state",))
    inputs = tokenize(onnx_folder, SENTENCES)
    got = run_onnx(path, inputs)["last_hidden_state"]
    expected = torch_outputs(torch_folder, "encoder", inputs).last_hidden_state.numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE


def test_quantized_variant_keeps_the_embeddings(bert_merges):
    torch_folder, onnx_folder = bert_merges
    inputs = tokenize(onnx_folder, SENTENCES)
    got = pool(run_onnx(onnx_folder / QUANTIZED, inputs)["last_hidden_state"], inputs["attention_mask"], "mean_tokens")
    expected = pool(torch_outputs(torch_folder, "encoder", inputs).last_hidden_state.numpy(),
                    inputs["attention_mask"], "mean_tokens")
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.99


def test_verify_checks_an_onnx_only_folder(bert_merges, capsys):
    _, folder = bert_merges
    report = verify_folder(folder)
    assert report.ok, report.problems
    assert any("onnx/model.onnx: last_hidden_state matches PyTorch (the weights in onnx/model.onnx)" in line
               for line in report.passed)
    assert any("model_qint8_avx512_vnni.onnx: mean_tokens pooled embeddings agree" in line for line in report.passed)
    assert run_cli("verify", folder) == 0
    assert "OK:" in capsys.readouterr().out


def test_check_catches_a_graph_of_other_weights(bert_merges, make_models, tmp_path):
    import shutil

    torch_folder, onnx_folder = bert_merges
    folder = tmp_path / "mixed"
    shutil.copytree(torch_folder, folder)
    shutil.copytree(onnx_folder / "onnx", folder / "onnx")
    # The torch weights of the other seed's model: the graph no longer computes what they compute.
    shutil.copy(make_models("bert-encoder", 2, pooling="mean")[1] / "model.safetensors", folder / "model.safetensors")
    result = check_onnx(folder)
    assert any("onnx/model.onnx: last_hidden_state differs from PyTorch" in p for p in result.problems)


@needs_st_onnx_backend
def test_sentence_transformers_onnx_backend_matches_torch(bert_merges):
    from sentence_transformers import SentenceTransformer

    torch_folder, onnx_folder = bert_merges
    expected = SentenceTransformer(str(torch_folder), device="cpu").encode(SENTENCES)
    got = SentenceTransformer(str(onnx_folder), backend="onnx", model_kwargs={"file_name": "model.onnx"}).encode(SENTENCES)
    assert np.abs(got - expected).max() <= TOLERANCE
    quantized = SentenceTransformer(str(onnx_folder), backend="onnx", model_kwargs={"file_name": QUANTIZED})
    q = quantized.encode(SENTENCES)
    cosine = (q * expected).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.99


def test_real_minilm_with_torch_weights_beside(minilm_path, tmp_path):
    """all-MiniLM-L6-v2 (mean pooling) merged with itself: [safetensors, onnx] writes both, and the ONNX
    model's mean-pooled embeddings are sentence-transformers' own."""
    from sentence_transformers import SentenceTransformer

    result = merge([minilm_path, minilm_path], "encoder", tmp_path / "minilm", weights=[0.5, 0.5],
                   save_format=["safetensors", "onnx"])
    folder = result.output
    assert (folder / "model.safetensors").is_file() and (folder / "onnx" / "model.onnx").is_file()
    assert {"model.safetensors", "onnx/model.onnx"} <= manifest_names(folder)
    inputs = tokenize(folder, SENTENCES)
    hidden = run_onnx(folder / "onnx" / "model.onnx", inputs)["last_hidden_state"]
    pooled = pool(hidden, inputs["attention_mask"], layout.pooling_mode(folder))
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    expected = SentenceTransformer(str(minilm_path), device="cpu").encode(SENTENCES)
    assert layout.pooling_mode(folder) == "mean_tokens"
    assert np.abs(pooled - expected).max() <= TOLERANCE
    if _optimum_error() is None:
        got = SentenceTransformer(str(folder), backend="onnx").encode(SENTENCES)
        assert np.abs(got - expected).max() <= TOLERANCE


# --- rerankers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert-reranker", "xlmr-reranker"])
def test_reranker_graph_has_logits(family, make_models, tmp_path):
    paths = make_models(family, 2)
    torch_folder = merge(paths, "reranker", tmp_path / "torch", weights=[0.3, 0.7]).output
    folder = merge(paths, "reranker", tmp_path / "onnx", weights=[0.3, 0.7], save_format="onnx").output
    path = folder / "onnx" / "model.onnx"
    assert_graph_signature(path, ("input_ids", "token_type_ids", "attention_mask"), ("logits",))
    inputs = tokenize(folder, PAIRS, pairs=True)
    got = run_onnx(path, inputs)["logits"]
    expected = torch_outputs(torch_folder, "reranker", inputs).logits.numpy()
    assert got.shape == expected.shape == (len(PAIRS), 1)
    assert np.abs(got - expected).max() <= TOLERANCE
    if _optimum_error() is None:
        from sentence_transformers import CrossEncoder

        scores = CrossEncoder(str(folder), backend="onnx").predict(PAIRS, activation_fn=torch.nn.Identity())
        reference = CrossEncoder(str(torch_folder), device="cpu").predict(PAIRS, activation_fn=torch.nn.Identity())
        assert np.abs(np.asarray(scores) - np.asarray(reference)).max() <= TOLERANCE


# --- bge-m3 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m3_merges(make_models, tmp_path_factory):
    """A bge-m3 merge written as [safetensors, onnx] with the external-data threshold forced to 0 bytes."""
    paths = make_models("xlmr-m3", 2, pooling="cls")
    root = tmp_path_factory.mktemp("m3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "EXTERNAL_DATA_THRESHOLD", 0)
        return merge(paths, "encoder", root / "onnx", weights=[0.5, 0.5], save_format="safetensors,onnx").output


def test_m3_writes_external_data_under_the_expected_names(m3_merges):
    folder = m3_merges
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [
        "model.onnx", "model.onnx_data", "model_m3.onnx", "model_m3.onnx_data"]
    assert {"onnx/model.onnx_data", "onnx/model_m3.onnx_data"} <= manifest_names(folder)
    import onnx

    locations = {
        entry.value
        for init in onnx.load(str(folder / "onnx" / "model.onnx"), load_external_data=False).graph.initializer
        for entry in init.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx_data"}


def _m3_reference(folder, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FlagEmbedding's own M3 model where it imports (stack A); else its formulas written out here."""
    batch = {k: torch.from_numpy(v) for k, v in inputs.items()}
    try:
        from FlagEmbedding import BGEM3FlagModel
    except Exception:  # noqa: BLE001 - FlagEmbedding fails inside transformers 5's imports
        from transformers import AutoModel

        from merge_hooks.heads import load_head

        hidden = AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state
        colbert, sparse = load_head(folder / "colbert_linear.pt"), load_head(folder / "sparse_linear.pt")
        mask = batch["attention_mask"]
        col = (hidden[:, 1:] @ colbert["weight"].T + colbert["bias"]) * mask[:, 1:, None].float()
        return {
            "dense_vecs": torch.nn.functional.normalize(hidden[:, 0], dim=-1).detach().numpy(),
            "sparse_vecs": torch.relu(hidden @ sparse["weight"].T + sparse["bias"]).detach().numpy(),
            "colbert_vecs": torch.nn.functional.normalize(col, dim=-1).detach().numpy(),
        }
    model = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu").model.eval()
    with torch.no_grad():
        out = model(batch, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    return {k: out[k].numpy() for k in ("dense_vecs", "sparse_vecs", "colbert_vecs")}


def test_m3_graph_computes_flagembeddings_three_outputs(m3_merges):
    folder = m3_merges
    assert_graph_signature(folder / "onnx" / "model_m3.onnx", ("input_ids", "token_type_ids", "attention_mask"),
                           ("dense_vecs", "sparse_vecs", "colbert_vecs"))
    inputs = tokenize(folder, SENTENCES)
    got = run_onnx(folder / "onnx" / "model_m3.onnx", inputs)
    expected = _m3_reference(folder, inputs)
    for name in ("dense_vecs", "sparse_vecs", "colbert_vecs"):
        assert got[name].shape == expected[name].shape, name
        assert np.abs(got[name] - expected[name]).max() <= TOLERANCE, name
    hidden = run_onnx(folder / "onnx" / "model.onnx", inputs)["last_hidden_state"]
    assert np.abs(hidden - torch_outputs(folder, "encoder", inputs).last_hidden_state.numpy()).max() <= TOLERANCE


@needs_st_onnx_backend
def test_sentence_transformers_loads_external_data(m3_merges):
    from sentence_transformers import SentenceTransformer

    folder = m3_merges
    expected = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    got = SentenceTransformer(str(folder), backend="onnx", model_kwargs={"file_name": "onnx/model.onnx"}).encode(SENTENCES)
    assert np.abs(got - expected).max() <= TOLERANCE


# --- errors ---------------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--model-type", "decoder", "--save-format", "onnx"], "the onnx format writes encoders and rerankers, not decoder"),
    (["--model-type", "encoder", "--onnx-quantize", "qint8"], "onnx_quantize needs the onnx format"),
    (["--model-type", "encoder", "--save-format", "onnx", "--onnx-quantize", "int4"], "output.onnx_quantize: Input should be 'qint8'"),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, message, make_models, tmp_path, capsys):
    family = "llama-decoder" if "decoder" in flags else "bert-encoder"
    paths = make_models(family, 2)
    code = run_cli("merge", *flags, "--models", *paths, "--weights", "0.5", "0.5", "-o", tmp_path / "out")
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_missing_extra_names_it(make_models, tmp_path, monkeypatch):
    from merge_hooks.formats import onnx as onnx_format

    monkeypatch.setitem(onnx_format.REQUIRED_MODULES, "onnx_runtime_that_is_not_installed", "onnxruntime")
    with pytest.raises(MergeHooksError, match=r"the onnx format needs onnxruntime: pip install 'merge-hooks\[onnx\]'"):
        merge(make_models("bert-encoder", 2), "encoder", tmp_path / "out", weights=[0.5, 0.5], save_format="onnx")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_verify_without_the_extra_names_it(bert_merges, monkeypatch):
    from merge_hooks.formats import onnx as onnx_format

    monkeypatch.setitem(onnx_format.REQUIRED_MODULES, "onnx_runtime_that_is_not_installed", "onnxruntime")
    result = onnx_format.FORMAT.check(bert_merges[1])
    assert result.problems == ["ONNX files found but onnxruntime not installed: pip install 'merge-hooks[onnx]'"]
    assert onnx_format.FORMAT.check(bert_merges[0]) is None


def test_failed_check_writes_nothing(make_models, tmp_path, monkeypatch):
    from merge_hooks.formats.onnx import check

    monkeypatch.setattr(check, "TOLERANCE", -1.0)
    with pytest.raises(MergeHooksError, match="the ONNX export does not compute what the PyTorch model computes, "
                                              "nothing was written: onnx/model.onnx: logits differs"):
        merge(make_models("bert-reranker", 2), "reranker", tmp_path / "out", weights=[0.5, 0.5], save_format="onnx")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_formats_lists_onnx_without_importing_it():
    code = ("import sys; from merge_hooks.cli import main\n"
            "try:\n    main(['formats'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("onnx ") for line in lines)
    assert lines[-1] == "[]"


def test_convert_writes_onnx_with_the_tokenizers_inputs(make_models, tmp_path):
    """An XLM-R reranker whose tokenizer gives no token_type_ids (as XLM-R's own does): neither does the graph."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(make_models("xlmr-reranker", 2)[0], source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert run_cli("convert", source, tmp_path / "out", "--save-format", "onnx", "-q") == 0
    folder = tmp_path / "out"
    assert (folder / "onnx" / "model.onnx").is_file() and not (folder / "model.safetensors").exists()
    assert_graph_signature(folder / "onnx" / "model.onnx", ("input_ids", "attention_mask"), ("logits",))
    inputs = tokenize(folder, PAIRS, pairs=True)
    assert "token_type_ids" not in inputs
    got = run_onnx(folder / "onnx" / "model.onnx", inputs)["logits"]
    assert np.abs(got - torch_outputs(source, "reranker", inputs).logits.numpy()).max() <= TOLERANCE
