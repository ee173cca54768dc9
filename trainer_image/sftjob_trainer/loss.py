"""Causal-LM loss computed only where a label exists, in chunks (the big CPU/memory lever).

Full-vocabulary logits for every position cost time and memory (B x L x V floats); most positions are
prompt or padding. `SelectiveLossLM` runs the decoder, gathers hidden states at labelled positions and
applies the output layer there only, chunk by chunk with activation recomputation, returning the *sum* of
token losses and the token count so the caller normalizes over the whole global batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def base_causal_lm(model: nn.Module) -> Any:
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _chunk_ce(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def labelled(
    hidden: torch.Tensor, targets: torch.Tensor, label_pos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and targets of the labelled positions only (flattened over the batch)."""
    if label_pos is None:
        mask = targets != IGNORE
        return hidden[mask], targets[mask]
    return hidden.flatten(0, 1).index_select(0, label_pos), targets.flatten().index_select(0, label_pos)


def _chunk_logps(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), t, reduction="none")


def sequence_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, label_pos: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: (sum of the log-probabilities of its labelled targets, how many there are).

    The output layer runs at labelled positions only, in chunks (as selective_ce_sum), so prompt and padding
    positions never get full-vocabulary logits; each token's log-probability goes to its row."""
    rows, width = targets.shape
    h, t = labelled(hidden, targets, label_pos)
    row_of = torch.div(label_pos, width, rounding_mode="floor")
    counts = torch.bincount(row_of, minlength=rows)
    n = int(t.shape[0])
    if n == 0:
        return hidden.sum() * 0.0 + hidden.new_zeros(rows, dtype=torch.float32), counts
    parts = [
        _chunk_logps(head, h, t)
        if n <= chunk
        else checkpoint(_chunk_logps, head, h[s : s + chunk], t[s : s + chunk], use_reentrant=False)
        for s in range(0, n, chunk)
    ]
    token_logps = torch.cat(parts) if len(parts) > 1 else parts[0]
    sums = hidden.new_zeros(rows, dtype=torch.float32).index_add(0, row_of, token_logps)
    return sums, counts


def selective_ce_sum(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 2048,
    label_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over positions whose target != IGNORE (targets already shifted).

    `label_pos` (flat indices of those positions, from `packing.collate`) avoids boolean-mask indexing, which
    waits for the GPU to learn how many positions there are (a host sync per micro-batch)."""
    h, t = labelled(hidden, targets, label_pos)
    n = int(t.shape[0])
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected (ZeRO-3 expects every rank to backward)
    if n <= chunk:
        return _chunk_ce(head, h, t), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        # recompute the chunk's logits in backward instead of keeping all of them alive
        total = total + checkpoint(_chunk_ce, head, h[s : s + chunk], t[s : s + chunk], use_reentrant=False)
    return total, n


class SelectiveLossLM(nn.Module):
    """Wraps a (peft) causal LM: forward(input_ids, position_ids, targets) -> (loss_sum, n_tokens).

    No attention mask on purpose: restarting position ids + use_cache=False make transformers build a
    block-diagonal causal mask, so packed samples never attend to each other.
    """

    def __init__(self, lm: nn.Module, neftune_alpha: float | None = None, chunk: int = 2048) -> None:
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        self.neftune_alpha = neftune_alpha
        if neftune_alpha:
            emb = base_causal_lm(lm).get_input_embeddings()
            emb.register_forward_hook(self._neftune_hook)

    def _neftune_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        # NEFTune (arXiv:2310.05914): uniform noise scaled by alpha / sqrt(L * d), training only
        if not self.training or not self.neftune_alpha:
            return output
        scale = self.neftune_alpha / (output.size(1) * output.size(2)) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: torch.Tensor,
        label_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        base = base_causal_lm(self.lm)
        out = base.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        head = base.get_output_embeddings()
        return selective_ce_sum(head, out.last_hidden_state, targets, self.chunk, label_pos)
