"""What each ONNX graph computes, as small torch modules around the transformers model.

The same modules are exported and, at check time, run in PyTorch as the reference, so the ONNX
files are compared with exactly the computation they were traced from. The transformers model is
called by keyword: transformers 5 models take some arguments by keyword only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ...heads import COLBERT_FILE, SPARSE_FILE, load_head
from .layout import ENCODER_OUTPUTS, M3_OUTPUTS, RERANKER_OUTPUTS

# Sentences of different lengths, so a check runs a padded batch.
PROBE_SENTENCES = (
    "What is the capital of France?",
    "Paris is the capital and largest city of France, on the Seine.",
    "ok",
    "Merged embedders are checked against PyTorch before anything is written to disk at all.",
)


class _Graph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def _run(self, inputs: tuple[torch.Tensor, ...]):
        return self.model(**dict(zip(self.input_names, inputs)), return_dict=True)


class EncoderGraph(_Graph):
    """``last_hidden_state`` of an encoder (what sentence-transformers and TEI pool)."""

    output_names = ENCODER_OUTPUTS

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._run(inputs).last_hidden_state


class RerankerGraph(_Graph):
    """``logits`` of a sequence-classification model (what CrossEncoder and TEI's rerank read)."""

    output_names = RERANKER_OUTPUTS

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._run(inputs).logits


class M3Graph(_Graph):
    """bge-m3's three outputs as FlagEmbedding 1.4.2's ``EncoderOnlyEmbedderM3Model.forward`` computes them
    for ``BGEM3FlagModel.encode`` (CLS pooling, ``normalize_embeddings=True``):

    - ``dense_vecs`` = normalize(last_hidden_state[:, 0])
    - ``sparse_vecs`` = relu(sparse_linear(last_hidden_state)), one weight per token, [batch, sequence, 1]
    - ``colbert_vecs`` = normalize(colbert_linear(last_hidden_state[:, 1:]) * attention_mask[:, 1:]), [batch, sequence - 1, dim]
    """

    output_names = M3_OUTPUTS

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], *, colbert: torch.nn.Linear,
                 sparse: torch.nn.Linear):
        super().__init__(model, input_names)
        self.colbert_linear = colbert
        self.sparse_linear = sparse

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self._run(inputs).last_hidden_state
        mask = inputs[self.input_names.index("attention_mask")]
        dense = F.normalize(hidden[:, 0], dim=-1)
        sparse = torch.relu(self.sparse_linear(hidden))
        colbert = self.colbert_linear(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
        return dense, sparse, F.normalize(colbert, dim=-1)


def _linear(state_dict: dict[str, torch.Tensor]) -> torch.nn.Linear:
    out_features, in_features = state_dict["weight"].shape
    layer = torch.nn.Linear(in_features, out_features)
    layer.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return layer.eval()


def m3_graph(model: torch.nn.Module, input_names: tuple[str, ...], folder: Path) -> M3Graph:
    """The bge-m3 graph with the heads read from ``folder`` (``colbert_linear.pt``, ``sparse_linear.pt``)."""
    return M3Graph(model, input_names, colbert=_linear(load_head(Path(folder) / COLBERT_FILE)),
                   sparse=_linear(load_head(Path(folder) / SPARSE_FILE))).eval()


def auto_class(kind: str):
    import transformers

    return transformers.AutoModelForSequenceClassification if kind == "reranker" else transformers.AutoModel


def load_model(folder: Path, kind: str, *, state_dict: Optional[dict[str, torch.Tensor]] = None) -> torch.nn.Module:
    """The model in ``folder`` in float32 (what ONNX Runtime runs on CPU), eager attention (what exports cleanly).

    With ``state_dict``, the model is built from ``config.json`` and takes those weights (all of them,
    strictly); an encoder is then built without its pooler, which ``last_hidden_state`` does not use
    and an exported graph therefore does not carry.
    """
    cls = auto_class(kind)
    if state_dict is None:
        model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    else:
        import transformers

        options = {"add_pooling_layer": False} if kind == "encoder" else {}
        model = cls.from_config(transformers.AutoConfig.from_pretrained(folder), attn_implementation="eager",
                                **options).to(torch.float32)
        # Buffers the model does not save (BERT's position_ids) are graph constants all the same.
        unsaved = {name for name, _ in model.named_buffers()} - set(model.state_dict())
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in unsaved}, strict=True)
    return model.eval()


def tokenize(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """The folder's tokenizer on the probe sentences (pairs of them for a reranker), padded to one batch;
    int64, in the tokenizer's input order, which is the order of the graph's inputs."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = list(PROBE_SENTENCES)
    pairs = texts[1:] + texts[:1] if kind == "reranker" else None
    batch = tokenizer(texts, pairs, padding=True, truncation=True, return_tensors="pt")
    return {name: batch[name].to(torch.int64) for name in tokenizer.model_input_names if name in batch}
