"""Regenerate the tokenizers the GGUF tests use, in ``tests/data/gguf_tokenizers/``.

- ``xlmr``: a SentencePiece unigram model (with its precompiled NFKC charsmap), converted to
  ``XLMRobertaTokenizerFast`` as bge-m3 ships it (fairseq id order, ``<s> ... </s>``).
- ``llama``: a SentencePiece BPE model with byte fallback, converted to ``LlamaTokenizerFast``.
- ``qwen2``: a byte-level BPE trained with ``tokenizers``, with Qwen2's split pattern.

Run it with stack A (transformers 4.x): ``python tests/data/make_gguf_tokenizers.py``;
the converted files load on both stacks.
"""

import io
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast, XLMRobertaTokenizerFast

HERE = Path(__file__).resolve().parent
OUT = HERE / "gguf_tokenizers"

CORPUS = """
The capital of France is Paris, and the capital of Germany is Berlin.
Search engines rank documents by how well they answer a query.
A merged model keeps the strengths of each fine-tuned model.
In 2024, 3 models were merged 12 times; 1.5 and 0.25 are the weights.
Café, naïve, résumé, façade and jalapeño carry accents.
Über die Brücke gehen wir heute Abend nach Hause.
El niño comió una manzana en la mañana.
北京是中国的首都。东京是日本的首都。
我想在苹果公司工作。今天天气很好。
Привет, как дела? Всё хорошо, спасибо.
Questions and answers: what is an embedding? It is a vector.
Numbers like 42, 1000, 3.14159 and 2718 appear in text!
Punctuation: commas, periods. Semicolons; colons: dashes - and (brackets).
The quick brown fox jumps over the lazy dog near the river bank.
Rerankers score a query and a passage together; embedders encode them apart.
""".strip().splitlines()
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]


def _lines() -> list[str]:
    # Repeated so the trainers see every piece often enough to keep it.
    return CORPUS * 20


def _train_sentencepiece(model_type: str, vocab_size: int, **options) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        **options,
    )
    return model.getvalue()


def _save(tokenizer, name: str) -> None:
    target = OUT / name
    shutil.rmtree(target, ignore_errors=True)
    tokenizer.save_pretrained(target)
    for extra in ("sentencepiece.bpe.model", "tokenizer.model"):
        (target / extra).unlink(missing_ok=True)


def make_xlmr(tmp: Path) -> None:
    # XLM-R's own model has <unk>=0, <s>=1, </s>=2; the fast tokenizer puts them in fairseq order.
    path = tmp / "xlmr.model"
    path.write_bytes(_train_sentencepiece("unigram", 300, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    _save(XLMRobertaTokenizerFast(vocab_file=str(path)), "xlmr")


def make_llama(tmp: Path) -> None:
    path = tmp / "llama.model"
    path.write_bytes(_train_sentencepiece("bpe", 400, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    tokenizer = LlamaTokenizerFast(vocab_file=str(path), add_bos_token=True, add_eos_token=False)
    _save(tokenizer, "llama")
    # transformers 4.57 leaves the word-start mark to its Python code, which transformers 5 does not run;
    # Llama 2 and Mistral ship it in tokenizer.json, so both stacks tokenize alike.
    saved = OUT / "llama" / "tokenizer.json"
    data = json.loads(saved.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]}
    data["pre_tokenizer"] = None
    saved.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config_path = OUT / "llama" / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["legacy"] = True
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def make_qwen2() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    _save(fast, "qwen2")


def main() -> None:
    assert transformers.__version__.startswith("4."), "run with stack A (transformers 4.x)"
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_xlmr(Path(tmp))
        make_llama(Path(tmp))
    make_qwen2()


if __name__ == "__main__":
    main()
