"""LoRA adapters as merge inputs: every supported variant equals peft's own merge_and_unload bit for bit.

Adapters are made by peft itself (``get_peft_model`` on the tiny models of ``builders``, every LoRA tensor
randomised so that each delta is non-zero, ``save_pretrained``); the reference is
``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` on the base loaded in the dtype compared.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ADDED_TOKENS, assert_same_bits, leftovers, make_adapter
from merge_hooks.cli import main
from merge_hooks.pipeline import run_recipe
from merge_hooks.recipe import model_entry_from_arg, recipe_from_dict

def peft_merged(base: Path, adapters: list[Path], *, dtype: torch.dtype, auto_class=None, emb: Path | None = None) -> dict:
    """peft's merge_and_unload of ``adapters`` in turn (as FlagEmbedding's raw_peft), base loaded in ``dtype``;
    FlagEmbedding's ``emb.pth`` (``emb``, or the adapter's own) set as input embedding first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(str(base), dtype=dtype)
    for adapter in adapters:
        embedding = emb or adapter / "embedding" / "emb.pth"
        if embedding.is_file():
            with torch.serialization.safe_globals([torch.nn.Embedding]):
                model.set_input_embeddings(torch.load(embedding, weights_only=True).to(dtype))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def merge_adapter(base: Path, adapters: list[Path], out: Path, *, dtype: str = "keep", verify: bool = False,
                  **entry) -> dict:
    adapter = [str(a) for a in adapters]
    recipe = recipe_from_dict({
        "model_type": "decoder",
        "models": [{"path": str(base), "adapter": adapter[0] if len(adapter) == 1 else adapter, "weight": 1.0, **entry}],
        "output": {"path": str(out), "dtype": dtype},
    })
    run_recipe(recipe, quiet=True, verify=verify)
    return load_file(str(out / "model.safetensors"))


def assert_matches_peft(merged: dict, reference: dict, *, changed: list[str]) -> None:
    """Every written tensor equals peft's (by its name or with the wrapped model's prefix), bit for bit."""
    expected = {}
    for name in merged:
        key = name if name in reference else name.removeprefix("model.")
        expected[name] = reference[key]
    assert_same_bits(merged, expected)
    for name in changed:  # the adapter did change these, so the comparison above was not base vs base
        assert any(name in key for key in merged), name


@pytest.fixture(scope="module")
def llama(make_models) -> Path:
    return make_models("llama-decoder", 1)[0]


@pytest.fixture(scope="module")
def llama_bf16(make_models) -> Path:
    return make_models("llama-decoder", 1, dtype=torch.bfloat16)[0]


VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"]),
    "patterns": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3},
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "embed_tokens"]),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["norm"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "keep-bf16", "float32-from-bf16", "float16-from-float32"])
def test_adapter_variant_equals_peft(variant, dtype, llama, llama_bf16, tmp_path):
    """Compared in the dtype the base is loaded in: as stored (``keep``) or converted (``dtype: float32``...)."""
    base = llama_bf16 if "bf16" in dtype else llama
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    option = {"keep-bf16": "keep", "float16-from-float32": "float16"}.get(dtype, "float32")
    torch_dtype = {"keep": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[option]
    merged = merge_adapter(base, [adapter], tmp_path / "out", dtype=option)
    assert all(t.dtype == torch_dtype for t in merged.values())
    reference = peft_merged(base, [adapter], dtype=torch_dtype)
    assert_matches_peft(merged, reference, changed=VARIANTS[variant]["target_modules"])
    base_tensors = load_file(str(base / "model.safetensors"))
    changed = [n for n in merged if not torch.equal(merged[n], base_tensors[n].to(torch_dtype))]
    assert changed, "the adapter changed nothing"


def test_fan_in_fan_out_conv1d_and_lora_bias_equal_peft(tmp_path):
    """GPT-2's Conv1D stores weights as (in, out): peft's fan_in_fan_out; its layers have biases for lora_bias."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True, lora_bias=True,
                           target_modules=["c_attn", "c_proj"])
    adapter_dora = make_adapter(base, tmp_path / "adapter-dora", seed=1, r=4, lora_alpha=8, fan_in_fan_out=True,
                                use_dora=True, bias="all", target_modules=["c_fc"], safe_serialization=False)
    assert (adapter_dora / "adapter_model.bin").is_file()
    merged = merge_adapter(base, [adapter, adapter_dora], tmp_path / "out", dtype="float32")
    reference = peft_merged(base, [adapter, adapter_dora], dtype=torch.float32)
    assert_matches_peft(merged, reference, changed=["c_attn", "c_fc"])
    base_tensors = load_file(str(base / "model.safetensors"))
    assert not torch.equal(merged["transformer.h.0.ln_1.bias"], base_tensors["transformer.h.0.ln_1.bias"])


def test_two_adapters_in_order_and_cli_plus_syntax(llama, tmp_path):
    first = make_adapter(llama, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_adapter(llama, tmp_path / "a2", seed=2, r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["merge", "-q", "--model-type", "decoder", "--models", f"{llama}+{first}+{second}", "--weights", "1",
              "--dtype", "float32", "--output", str(out)])
    assert done.value.code == 0
    merged = load_file(str(out / "model.safetensors"))
    assert_matches_peft(merged, peft_merged(llama, [first, second], dtype=torch.float32), changed=["q_proj"])
    swapped = peft_merged(llama, [second, first], dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], swapped[name]), "the order of the adapters must matter"


def test_adapter_mixed_with_the_base_is_the_weighted_sum(llama, tmp_path):
    """``--models base+lora base``: LM_Cocktail's mix of peft's merge and the base, as FlagEmbedding users do it."""
    adapter = make_adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["merge", "-q", "--model-type", "decoder", "--models", f"{llama}+{adapter}", str(llama),
              "--weights", "0.7", "0.3", "--output", str(out)])
    assert done.value.code == 0
    merged = load_file(str(out / "model.safetensors"))
    tuned = peft_merged(llama, [adapter], dtype=torch.float32)
    base = load_file(str(llama / "model.safetensors"))
    expected = {name: 0.7 * tuned[name] + 0.3 * base[name] for name in base}  # LM_Cocktail's merge_param order
    assert_same_bits(merged, expected)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["adapters"][0][0]["adapter"] == str(adapter)
    assert info["adapters"][0][0]["scaling"] == [{"r": 4, "lora_alpha": 8, "scaling": 2.0}]
    assert info["adapters"][1] == []
    weights_sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert info["adapters"][0][0]["weights"] == {"file": "adapter_model.safetensors", "sha256": weights_sha}
    card = (out / "README.md").read_text()
    assert f"LoRA adapter `{adapter}` merged into `{llama}`" in card and "scaling=2" in card
    assert "- lora\n" in card.split("---")[1]  # a tag in the front matter the Hub reads


def _embedder_adapter(llama: Path, root: Path) -> Path:
    """FlagEmbedding's decoder embedder fine-tune with --additional_special_tokens, saved under checkpoint-N."""
    from transformers import AutoModel

    output_dir = root / "lora-out"
    make_adapter(llama, output_dir / "checkpoint-20", seed=3, auto_class=AutoModel, resize=len(ADDED_TOKENS),
                 r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    make_adapter(llama, root / "older" / "checkpoint-5", seed=4, auto_class=AutoModel, r=2, lora_alpha=2,
                 target_modules=["q_proj"])
    (root / "older" / "checkpoint-5").rename(output_dir / "checkpoint-5")
    # FlagEmbedding keeps emb.pth and the tokenizer in the output folder itself.
    for name in ("embedding", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        source = output_dir / "checkpoint-20" / name
        if source.exists():
            source.rename(output_dir / name)
    return output_dir


def test_flagembedding_layout_emb_pth_checkpoint_and_tokenizer(llama, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    output_dir = _embedder_adapter(llama, tmp_path)
    out = tmp_path / "merged"
    merged = merge_adapter(llama, [output_dir], out, dtype="float32", verify=True)
    reference = peft_merged(llama, [output_dir / "checkpoint-20"], dtype=torch.float32, auto_class=AutoModel,
                            emb=output_dir / "embedding" / "emb.pth")
    emb = reference["embed_tokens.weight"]
    base_vocab = json.loads((llama / "config.json").read_text())["vocab_size"]
    assert merged["model.embed_tokens.weight"].shape == emb.shape == (base_vocab + len(ADDED_TOKENS), 32)
    assert_matches_peft(merged, reference, changed=["embed_tokens", "q_proj"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == emb.shape[0]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == emb.shape[0]
    assert tokenizer.convert_tokens_to_ids("<query>") >= emb.shape[0] - 3
    loaded = AutoModel.from_pretrained(str(out)).state_dict()
    assert torch.equal(loaded["embed_tokens.weight"], emb)


def test_each_adapter_brings_its_own_emb_pth(llama, tmp_path):
    """FlagEmbedding's raw_peft then output_dir: each emb.pth is set before its own adapter is merged."""
    from transformers import AutoModel

    lora = dict(auto_class=AutoModel, resize=len(ADDED_TOKENS), r=2, lora_alpha=4,
                target_modules=["embed_tokens", "q_proj"])
    first = make_adapter(llama, tmp_path / "raw-peft", seed=6, **lora)
    second = make_adapter(llama, tmp_path / "output-dir", seed=7, **lora)
    merged = merge_adapter(llama, [first, second], tmp_path / "out", dtype="float32")
    reference = peft_merged(llama, [first, second], dtype=torch.float32, auto_class=AutoModel)
    assert_matches_peft(merged, reference, changed=["embed_tokens"])


@pytest.mark.stack_a
def test_merged_decoder_loads_with_flagembedding(llama, tmp_path):
    from FlagEmbedding import FlagLLMModel, FlagLLMReranker
    from transformers import AutoModel

    output_dir = _embedder_adapter(llama, tmp_path)
    out = tmp_path / "merged"
    merge_adapter(llama, [output_dir], out, dtype="float32")
    reference = peft_merged(llama, [output_dir / "checkpoint-20"], dtype=torch.float32, auto_class=AutoModel,
                            emb=output_dir / "embedding" / "emb.pth")
    embedder = FlagLLMModel(str(out), use_fp16=False, devices="cpu", normalize_embeddings=True)
    vectors = embedder.encode_queries(["<query> what is paris", "capital of france"])
    assert vectors.shape == (2, 32) and torch.isfinite(torch.as_tensor(vectors)).all()
    state = embedder.model.state_dict()
    assert torch.equal(state["embed_tokens.weight"], reference["embed_tokens.weight"])
    assert torch.equal(state["layers.0.self_attn.q_proj.weight"], reference["layers.0.self_attn.q_proj.weight"])
    reranker = FlagLLMReranker(str(out), use_fp16=False, devices="cpu")
    scores = reranker.compute_score([["what is paris", "paris is the capital of france"]])
    assert len(scores) == 1 and torch.isfinite(torch.as_tensor(scores)).all()


def _fails(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what building the models printed (transformers 5's loading bars)
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _bad_merge(llama: Path, adapter: Path, tmp_path: Path, capsys, *extra: str) -> str:
    out = tmp_path / "out"
    message = _fails(["merge", "-q", "--model-type", "decoder", "--models", f"{llama}+{adapter}", *extra,
                      "--weights", "1", "--output", str(out)], capsys)
    assert not out.exists() and leftovers(tmp_path, "out") == []
    return message


def test_bad_adapters_are_one_line_errors(llama, make_models, tmp_path, capsys):
    good = make_adapter(llama, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no adapter_config.json" in _bad_merge(llama, empty, tmp_path, capsys)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    assert "has no weights" in _bad_merge(llama, no_weights, tmp_path, capsys)

    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    assert "is a peft IA3 adapter; merge-hooks merges LoRA adapters only" in _bad_merge(llama, ia3, tmp_path, capsys)

    for init in ("pissa", "olora", "corda"):
        variant = tmp_path / init
        variant.mkdir()
        config = json.loads((good / "adapter_config.json").read_text()) | {"init_lora_weights": init}
        (variant / "adapter_config.json").write_text(json.dumps(config))
        (variant / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        assert "rewrite the base weights" in _bad_merge(llama, variant, tmp_path, capsys)

    replicated = tmp_path / "replicated"
    replicated.mkdir()
    config = json.loads((good / "adapter_config.json").read_text()) | {"layer_replication": [[0, 2], [1, 2]]}
    (replicated / "adapter_config.json").write_text(json.dumps(config))
    assert "layer_replication" in _bad_merge(llama, replicated, tmp_path, capsys)

    # emb.pth is unpickled with nn.Embedding as the only class allowed: anything else is refused unrun.
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "embedding").mkdir()
    torch.save(torch.nn.Linear(2, 2), pickled / "embedding" / "emb.pth")
    assert "only that is accepted" in _bad_merge(llama, pickled, tmp_path, capsys)

    quantized = tmp_path / "quantized"
    shutil.copytree(llama, quantized)
    config = json.loads((quantized / "config.json").read_text()) | {"quantization_config": {"quant_method": "bitsandbytes"}}
    (quantized / "config.json").write_text(json.dumps(config))
    assert "is a bitsandbytes quantized model" in _bad_merge(quantized, good, tmp_path, capsys)

    bert = make_models("bert-encoder", 1)[0]
    assert "targets module 'model.layers.0.self_attn.q_proj', which model" in _bad_merge(bert, good, tmp_path, capsys)

    tensors = load_file(str(good / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    for name, change, expected in (
        ("shape", lambda t: t[:, :16] if t.shape[1] == 32 else t, "shape mismatch"),
        ("rank", lambda t: t[:, :3] if t.shape[1] == 4 else t, "rank mismatch between lora_A"),
    ):
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file({k: change(v).contiguous() for k, v in tensors.items()}, str(bad / "adapter_model.safetensors"))
        assert expected in _bad_merge(llama, bad, tmp_path, capsys)


def test_wrong_base_is_an_error_unless_allowed(make_models, tmp_path, capsys):
    base, other = make_models("llama-decoder", 2)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    # A copy of the base is the same base: no error.
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    merge_adapter(copy, [adapter], tmp_path / "from-copy")
    message = _bad_merge(other, adapter, tmp_path, capsys)
    assert f"was trained on '{base}'" in message and "allow_base_mismatch" in message
    merged = merge_adapter(other, [adapter], tmp_path / "allowed", allow_base_mismatch=True)
    assert_matches_peft(merged, peft_merged(other, [adapter], dtype=torch.float32), changed=["q_proj"])
    # A hub id is looked up in the local cache: there it is a copy of `other`, not the given base.
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--org--cached-base"
    shutil.copytree(other, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": "org/cached-base"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "was trained on 'org/cached-base'" in _bad_merge(base, adapter, tmp_path, capsys)
    merge_adapter(other, [adapter], tmp_path / "cached-base")
    # An adapter whose base cannot be found is merged with a warning.
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": "nobody/nothing"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merge_adapter(other, [adapter], tmp_path / "unresolved")


def test_verify_against_recomputes_the_adapter_delta(llama, tmp_path):
    from merge_hooks.recipe import load_recipe
    from merge_hooks.verify import verify_folder

    adapter = make_adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    merge_adapter(llama, [adapter], out)
    report = verify_folder(out, against=load_recipe(out / "merge_recipe.yaml"))
    assert report.ok, report.problems
    assert any("with the adapter deltas" in line for line in report.passed)
    # Against another adapter of the same shapes, the sampled adapted tensors differ.
    other = make_adapter(llama, tmp_path / "other", seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    recipe = load_recipe(out / "merge_recipe.yaml")
    recipe.models[0].adapter = str(other)
    report = verify_folder(out, against=recipe)
    assert not report.ok and any("q_proj" in p or "v_proj" in p for p in report.problems)


def test_recipe_rules_for_adapters(llama, tmp_path):
    from merge_hooks.errors import MergeHooksError

    one = {"model_type": "decoder", "models": [{"path": str(llama), "weight": 1.0}], "output": {"path": "x"}}
    with pytest.raises(MergeHooksError, match="one model is allowed with an adapter"):
        recipe_from_dict(one)
    one["models"][0]["adapter"] = ["a", "b"]
    assert recipe_from_dict(one).models[0].adapters == ["a", "b"]
    with pytest.raises(MergeHooksError, match="adapters are merged by the stream engine"):
        recipe_from_dict(one | {"engine": "cocktail"})
    with pytest.raises(MergeHooksError, match="no empty parts"):
        model_entry_from_arg(f"{llama}+")
    assert model_entry_from_arg(f"{llama}+a+b") == {"path": str(llama), "adapter": ["a", "b"]}


def test_adapter_files_outside_the_adapter_folder_are_refused(llama, tmp_path, capsys):
    """An adapter's config, weights or resized embedding symlinked out of its folder is never read."""
    good = make_adapter(llama, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])
    outside = tmp_path / "elsewhere"
    shutil.copytree(good, outside)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        linked = tmp_path / f"linked-{name}"
        shutil.copytree(good, linked)
        (linked / name).unlink()
        (linked / name).symlink_to(outside / name)
        assert f"{name!r} of {linked} lies outside that folder" in _bad_merge(llama, linked, tmp_path, capsys)
