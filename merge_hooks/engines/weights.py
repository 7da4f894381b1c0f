"""Weights for ``mix_models_with_data``, computed with LM_Cocktail's own loss functions in less memory.

LM_Cocktail loads every candidate model before scoring them (N + 1 models in memory). Here the
candidates are loaded one at a time into the first model, so at most two are held; the losses,
the softmax and so the weights are LM_Cocktail's.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Iterator, Optional

from ..errors import MergeHooksError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Seed Python's, numpy's and torch's generators for a block, then restore them; no-op for ``None``.

    LM_Cocktail samples each example's negatives with ``random.sample`` and no seed, so the weights of
    ``mix_models_with_data`` change from run to run; under one seed they do not.

    Example:
        >>> with seeded(0):
        ...     weights = compute_weights(paths, "encoder", examples, ...)
    """
    if seed is None:
        yield
        return
    import numpy
    import torch

    states = random.getstate(), numpy.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def compute_weights(
    model_paths: list[Path],
    model_type: str,
    examples: list[dict],
    *,
    temperature: float,
    batch_size: int,
    max_input_length: int,
    neg_number: int,
    trust_remote_code: bool,
    quiet: bool = True,
) -> list[float]:
    """Score every model on ``examples`` with LM_Cocktail's loss and turn the losses into weights.

    Example:
        >>> compute_weights([base, tuned], "encoder", examples, temperature=5.0, batch_size=2,
        ...                 max_input_length=512, neg_number=7, trust_remote_code=False)
        [0.41, 0.59]
    """
    import torch
    from LM_Cocktail import utils
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..progress import loader_progress_bars

    device = torch.device("cpu")
    with loader_progress_bars(enabled=False):
        base = utils.load_model(str(model_paths[0]), model_type=model_type, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(model_paths[0]), trust_remote_code=trust_remote_code)
    if model_type == "decoder":
        if tokenizer.pad_token_id is None:
            # LM_Cocktail pads with pad_token_id; decoder tokenizers often have none. Padding is masked out
            # of the loss, so the end-of-sequence token serves.
            if tokenizer.eos_token_id is None:
                raise MergeHooksError(f"the tokenizer of {model_paths[0]} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        data = utils.preprocess_data_for_llm(
            example_data=examples, tokenizer=tokenizer, device=device, batch_size=batch_size,
            max_input_length=max_input_length,
        )
        loss_fn = utils.llm_loss
    else:
        data = utils.preprocess_data_for_embedder(
            example_data=examples, tokenizer=tokenizer, device=device, batch_size=batch_size,
            max_input_length=max_input_length, neg_number=neg_number,
        )
        loss_fn = utils.embedder_loss

    losses = []
    # One bar naming each model scored, instead of transformers 5's anonymous one per load.
    scoring = tqdm(model_paths, unit="model", disable=quiet, leave=False, dynamic_ncols=True)
    with torch.no_grad(), loader_progress_bars(enabled=False), scoring:
        for path in scoring:
            scoring.set_description(f"scoring {path} on the examples")
            candidate = utils.load_model(str(path), model_type=model_type, trust_remote_code=trust_remote_code)
            base.load_state_dict(candidate.state_dict())
            del candidate
            losses.append(loss_fn(base_model=base, input_data=data))
            logger.info("loss of %s on the examples: %.6f", path, losses[-1])
    return torch.softmax(-torch.FloatTensor(losses) / temperature, -1).numpy().tolist()
