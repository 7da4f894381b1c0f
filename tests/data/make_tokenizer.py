"""Regenerate the tiny test tokenizer in ``tests/data/tokenizer/``.

Run it with stack A (transformers 4.x): ``.venv-a/bin/python tests/data/make_tokenizer.py``.
transformers 5 ignores ``vocab_file`` and writes a tokenizer that transformers 4.57 cannot
load, so the committed files must come from stack A to load on both stacks.
"""

from pathlib import Path

import transformers
from transformers import BertTokenizerFast

HERE = Path(__file__).resolve().parent
OUT = HERE / "tokenizer"

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = list(".,?!'\"-:;()")
WORDS = """
a an the this that these those it its is are was were be been being am do does did done
have has had not no yes and or but if then so as of in on at to from by with for about
into over under after before between through during without up down out off again
what which who whom whose where when why how all any both each few more most other some
such only own same than too very can will just should would could may might must
i me my we our you your he him his she her they them their there here
capital city country france paris germany berlin italy rome spain madrid england london
europe world river sea mountain north south east west city town people person man woman
child children name day night year time week today morning evening water fire earth air
sun moon star sky light dark good bad big small new old long short high low large little
first last best great many much one two three four five six seven eight nine ten
go goes went make made take took see saw know knew think say said come came give gave
find found tell told ask asked use used work play run read write eat drink like love
cat dog bird fish tree flower house car book food music language english french german
question answer search query document passage model embedding text word sentence
""".split()
SUBWORDS = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##a", "##e", "##i", "##o", "##n", "##t"]


def main() -> None:
    assert transformers.__version__.startswith("4."), "run with stack A (transformers 4.x)"
    vocab = list(dict.fromkeys(SPECIAL + PUNCTUATION + WORDS + SUBWORDS))
    OUT.mkdir(parents=True, exist_ok=True)
    vocab_file = OUT / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=128)
    tokenizer.save_pretrained(OUT)


if __name__ == "__main__":
    main()
