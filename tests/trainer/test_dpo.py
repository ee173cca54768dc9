"""The DPO objective (sftjob_trainer/dpo.py) against a reference written out by hand on the tiny Llama.

The reference scores each sequence alone with a plain forward pass and sums log-softmax values of the
response tokens in Python; the code under test scores all chosen and rejected rows of a padded micro-batch
in one forward with the output layer at response positions only. Their agreement shows the prompt and the
padding are masked and that a pair's rows do not see each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.trainer


@dataclass(frozen=True)
class P:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


PAIRS = [
    P([10, 11, 12, 13], [20, 21, 22], [30, 31]),
    P([14, 15], [23, 24, 25, 26, 27], [32]),
    P([16, 17, 18, 19, 40, 41], [28], [33, 34, 35, 36]),
]
BETA = 0.3
REF = [(-9.5, -7.25), (-14.0, -3.5), (-2.0, -11.0)]  # made-up reference log-probabilities


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def by_hand(model, prompt: list[int], response: list[int]) -> float:
    """Sum over response tokens of log p(token | everything before it), one sequence, full logits."""
    import torch

    ids = prompt + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))


def batched(model, pairs, pad_id: int = 3):
    import torch

    from sftjob_trainer.dpo import PolicyLogps, collate_pairs, pair_logps

    with torch.no_grad():
        return pair_logps(PolicyLogps(model).eval(), collate_pairs(pairs, pad_id))


def test_sequence_logps_and_losses_equal_a_hand_computed_reference(tiny_lm):
    import torch

    from sftjob_trainer.dpo import dpo_loss

    pc, pj, nc, nj = batched(tiny_lm, PAIRS)
    hand_c = [by_hand(tiny_lm, p.prompt, p.chosen) for p in PAIRS]
    hand_j = [by_hand(tiny_lm, p.prompt, p.rejected) for p in PAIRS]
    assert pc.tolist() == pytest.approx(hand_c, abs=1e-4)
    assert pj.tolist() == pytest.approx(hand_j, abs=1e-4)
    assert nc.tolist() == [len(p.chosen) for p in PAIRS] and nj.tolist() == [len(p.rejected) for p in PAIRS]

    rc = torch.tensor([r[0] for r in REF])
    rj = torch.tensor([r[1] for r in REF])
    sig = dpo_loss(pc, pj, rc, rj, BETA, "sigmoid")
    ipo = dpo_loss(pc, pj, rc, rj, BETA, "ipo", nc, nj)
    rpo = dpo_loss(pc, pj, rc, rj, BETA, "sigmoid", nc, nj, sft_weight=0.5)
    for i, p in enumerate(PAIRS):
        chosen_ratio, rejected_ratio = hand_c[i] - REF[i][0], hand_j[i] - REF[i][1]
        x = BETA * (chosen_ratio - rejected_ratio)
        assert float(sig.losses[i]) == pytest.approx(math.log1p(math.exp(-x)), rel=1e-4)  # -log sigmoid(x)
        # TRL's ipo: log-ratios averaged over each response's tokens, squared distance to 1 / (2 beta)
        d = chosen_ratio / len(p.chosen) - rejected_ratio / len(p.rejected)
        assert float(ipo.losses[i]) == pytest.approx((d - 1 / (2 * BETA)) ** 2, rel=1e-4)
        # sftLossWeight: plus the weight times the chosen response's mean token NLL (RPO)
        nll = -hand_c[i] / len(p.chosen)
        assert float(rpo.losses[i]) == pytest.approx(math.log1p(math.exp(-x)) + 0.5 * nll, rel=1e-4)
        assert float(sig.rewards_chosen[i]) == pytest.approx(BETA * chosen_ratio, rel=1e-4)
        assert float(sig.rewards_rejected[i]) == pytest.approx(BETA * rejected_ratio, rel=1e-4)
        assert float(sig.accuracy[i]) == float(chosen_ratio > rejected_ratio)
    assert 0 < sig.accuracy.sum() < len(PAIRS)  # the made-up reference makes both outcomes occur
    with pytest.raises(ValueError, match="ipo averages"):
        dpo_loss(pc, pj, rc, rj, BETA, "ipo")
    with pytest.raises(ValueError, match="chosen tokens"):
        dpo_loss(pc, pj, rc, rj, BETA, "sigmoid", sft_weight=0.5)


def test_prompt_and_padding_never_contribute(tiny_lm):
    import torch

    from sftjob_trainer.data import IGNORE
    from sftjob_trainer.dpo import collate_pairs
    from sftjob_trainer.loss import sequence_logps

    # another padding token: the same log-probabilities (padding follows the sequences, causal attention)
    a, b = batched(tiny_lm, PAIRS, pad_id=3), batched(tiny_lm, PAIRS, pad_id=200)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-6) for x, y in zip(a, b, strict=True))

    # at the output layer: hidden states at prompt and padding positions may be anything
    batch = collate_pairs(PAIRS, 0)
    targets, label_pos = batch["targets"], batch["label_pos"]
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(*targets.shape, 16)
    sums, counts = sequence_logps(head, hidden, targets, label_pos)
    unlabelled = targets == IGNORE
    assert unlabelled.any() and (~unlabelled).any()
    noisy = hidden.clone()
    noisy[unlabelled] = torch.randn(int(unlabelled.sum()), 16) * 100
    same, _ = sequence_logps(head, noisy, targets, label_pos)
    assert torch.equal(sums, same)
    assert counts.tolist() == [len(p.chosen) for p in PAIRS] + [len(p.rejected) for p in PAIRS]
    # a response position does count (the check above can fail)
    row, col = divmod(int(label_pos[0]), targets.shape[1])
    noisy[row, col] += 1.0
    moved, _ = sequence_logps(head, noisy, targets, label_pos)
    assert not torch.equal(sums, moved) and torch.equal(sums[1:], moved[1:])
    # chunked (activation recomputation) gives the same sums
    chunked, _ = sequence_logps(head, hidden, targets, label_pos, chunk=3)
    assert torch.allclose(sums, chunked, atol=1e-5)
