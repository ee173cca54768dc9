"""The perplexity scorer for spec.dataset.curation.perplexity: the base model's perplexity of each example's
answer tokens (the labelled ones), before any training, by one process (the curate stage, or rank 0 of the
train stage when there is none) on a copy of the base model of its own (pipeline.base_model_scorer)."""

from __future__ import annotations

import math
from typing import Any

from ..data import IGNORE, Example
from .curate import Scorer

BATCH = 8


def make_scorer(model: Any, batch: int = BATCH) -> Scorer:
    import torch

    def score(examples: list[Example]) -> list[float]:
        out: list[float] = []
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for k in range(0, len(examples), batch):
                idx = list(range(k, min(k + batch, len(examples))))
                width = max(len(examples[i].input_ids) for i in idx)
                ids = torch.zeros((len(idx), width), dtype=torch.long)
                labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    e = examples[i]
                    ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                    labels[row, : len(e.labels)] = torch.tensor(e.labels)
                    mask[row, : len(e.input_ids)] = 1
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tgt = labels[:, 1:].to(device)
                keep = tgt != IGNORE
                nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
                per_row = nll.sum(1) / keep.sum(1).clamp(min=1)
                out += [math.exp(min(float(x), 50.0)) for x in per_row]
        model.train(was_training)
        return out

    return score
