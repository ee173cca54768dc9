"""The DPO objective: sequence log-probabilities of responses and the preference loss (docs/alignment.md).

A pair's chosen and rejected responses are two rows of one micro-batch (`collate_pairs`: all chosen rows,
then all rejected rows), one sequence per row, so they never see each other; each row is prompt + response
with the prompt's labels masked, so only response tokens count. `PolicyLogps` runs the decoder and, through
loss.sequence_logps, the output layer at response positions only, returning each row's summed
log-probability and its token count.

Losses, per pair, with policy (p) and reference (r) summed log-probabilities of chosen (c) and rejected (j):
  sigmoid  -log sigmoid(beta * ((pc - rc) - (pj - rj)))                   (Rafailov et al., 2023)
  ipo      ((pc - rc) / nc - (pj - rj) / nj - 1 / (2 beta))^2             (Azar et al., 2023; as TRL 1.x:
           the log-ratios averaged over each response's n tokens)
With spec.alignment.sftLossWeight w > 0 each pair's loss adds w * (-pc / nc): the chosen response's mean
token negative log-likelihood (RPO, Pang et al. 2024, length-normalised as there).
Rewards are beta * (policy - reference) summed log-probability, as TRL reports them (also for ipo).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from .data import IGNORE, Example
from .loss import SelectiveLossLM, base_causal_lm, sequence_logps
from .packing import Batch, collate
from .preference_data import PreferenceData, PreferencePair, load_preference_data

LOSSES = ("sigmoid", "ipo")
# The per-step statistics the align stage reports (means over the step's pairs), in this order.
STATS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
    "ref_logps_chosen",
    "ref_logps_rejected",
)


Pair = PreferencePair  # prompt, chosen, rejected token ids (and origin)


def load_pairs(cfg: Any, tok: Any) -> PreferenceData:
    """spec.alignment.dataset's pairs: PreferenceData(train, eval, report) (preference_data.py)."""
    return load_preference_data(cfg, tok)


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """The content of a list of pairs (token ids, in order)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def sequence(prompt: list[int], response: list[int]) -> Example:
    """prompt + response, the prompt's labels masked."""
    return Example(prompt + response, [IGNORE] * len(prompt) + response)


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> Batch:
    """One micro-batch of B pairs as 2B rows: chosen responses in rows 0..B-1, rejected in B..2B-1."""
    examples = [sequence(p.prompt, p.chosen) for p in pairs] + [sequence(p.prompt, p.rejected) for p in pairs]
    return collate([[i] for i in range(len(examples))], examples, pad_id)


def pair_tokens(p: Pair) -> int:
    """Tokens a pair costs in a forward pass (both rows)."""
    return 2 * len(p.prompt) + len(p.chosen) + len(p.rejected)


class PolicyLogps(SelectiveLossLM):
    """forward(input_ids, position_ids, targets, label_pos) -> (per-row summed log-probability of the labelled
    tokens, per-row token count). The same module (and parameter names) as training's wrapper."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: torch.Tensor,
        label_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = base_causal_lm(self.lm)
        out = base.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if label_pos is None:
            label_pos = (targets.flatten() != IGNORE).nonzero().flatten()
        return sequence_logps(
            base.get_output_embeddings(), out.last_hidden_state, targets, label_pos, self.chunk
        )


def pair_logps(module: Any, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities and (chosen, rejected) token counts of a collate_pairs
    batch; `module` is PolicyLogps or the DeepSpeed engine wrapping it."""
    sums, counts = module(b["input_ids"], b["position_ids"], b["targets"], b["label_pos"])
    n = sums.shape[0] // 2
    return sums[:n], sums[n:], counts[:n], counts[n:]


@dataclass
class DpoOut:
    losses: torch.Tensor  # per pair
    rewards_chosen: torch.Tensor  # beta * (policy - reference), per pair
    rewards_rejected: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.rewards_chosen - self.rewards_rejected

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.rewards_chosen > self.rewards_rejected).float()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    n_chosen: torch.Tensor | None = None,
    n_rejected: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> DpoOut:
    """Per-pair DPO losses and rewards from summed log-probabilities (ipo and sft_weight > 0 also need the
    token counts)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":
        if n_chosen is None or n_rejected is None:
            raise ValueError("ipo averages the log-ratios over tokens: pass n_chosen and n_rejected")
        delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: expected one of {', '.join(LOSSES)}")
    if sft_weight:
        if n_chosen is None:
            raise ValueError("the SFT term averages over the chosen tokens: pass n_chosen")
        losses = losses - sft_weight * policy_chosen / n_chosen.clamp(min=1)
    return DpoOut(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def stat_sums(
    out: DpoOut, pc: torch.Tensor, pj: torch.Tensor, rc: torch.Tensor, rj: torch.Tensor
) -> torch.Tensor:
    """Sums over the micro-batch's pairs of each of STATS (float64, for an all-reduce and a mean)."""
    cols = (out.rewards_chosen, out.rewards_rejected, out.margin, out.accuracy, pc, pj, rc, rj)
    return torch.stack([c.detach().double().sum() for c in cols])


def preference_scores(
    model: Any,
    pairs: Sequence[Pair],
    ref: Sequence[Sequence[float]],
    beta: float,
    pad_id: int,
    batch: int = 8,
) -> dict[str, float]:
    """Held-out preference accuracy and mean reward margin of `model` (a causal LM, no DeepSpeed) on `pairs`
    against the reference's stored log-probabilities `ref` ([chosen, rejected] per pair); and
    chosen_logp_accuracy: the share of pairs whose chosen response `model` itself finds more likely (the
    measure that also applies to the reference and the base model, whose implicit rewards are 0)."""
    wrapper = PolicyLogps(model).eval()
    dev = next(model.parameters()).device
    correct, margin, own = 0.0, 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            b = collate_pairs(pairs[s : s + batch], pad_id)
            b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            pc, pj, _, _ = pair_logps(wrapper, b)
            r = torch.tensor(ref[s : s + batch], dtype=torch.float32, device=dev)
            out = dpo_loss(pc, pj, r[:, 0], r[:, 1], beta)  # rewards do not depend on the loss kind
            correct += float(out.accuracy.sum())
            margin += float(out.margin.sum())
            own += float((pc > pj).sum())
    n = max(len(pairs), 1)
    return {
        "preference_accuracy": correct / n,
        "reward_margin": margin / n,
        "chosen_logp_accuracy": own / n,
        "preference_pairs": len(pairs),
    }


def chosen_logp_accuracy(logps: Sequence[Sequence[float]]) -> float:
    """The share of [chosen, rejected] log-probability pairs in which chosen is the more likely."""
    return sum(c > r for c, r in logps) / max(len(logps), 1)
