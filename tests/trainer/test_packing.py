"""Packing: no cross-sample attention (packed loss == sum of separate losses) and a correct masked loss."""

from __future__ import annotations

import pytest

from sftjob_trainer.data import IGNORE, Example
from sftjob_trainer.packing import collate, micro_batches_for, pack_rows, row_arrays

pytestmark = pytest.mark.trainer


def test_pack_rows_fits_and_keeps_every_sample():
    lengths = [5, 9, 3, 7, 2, 8, 1, 6]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5  # 41 tokens need >= 5 rows of 10
    assert pack_rows(lengths, 10) == rows  # deterministic


def test_layout_covers_the_step_once_across_ranks():
    lengths = list(range(1, 17))
    rows = [[i] for i in range(16)]
    got = [r for rank in range(2) for mb in micro_batches_for(rank, 2, 8, rows, lengths, 2, 2) for r in mb]
    assert sorted(i for r in got for i in r) == list(range(8, 16))  # the step from row 8 = rows 8..15


def test_row_targets_never_cross_samples():
    a = Example([1, 2, 3], [IGNORE, 2, 3])
    b = Example([4, 5], [4, 5])
    ids, tgt, pos = row_arrays([0, 1], [a, b])
    assert ids == [1, 2, 3, 4, 5] and pos == [0, 1, 2, 0, 1]
    assert tgt == [2, 3, IGNORE, 5, IGNORE]  # a's last token does not predict b's first


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from sftjob_trainer.data import build_examples
    from sftjob_trainer.records import DropReport, Row

    from .tiny import dataset_rows

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rep = DropReport()
    rows = [Row(r, str(i)) for i, r in enumerate(dataset_rows(4, seed=1))]
    return model, build_examples(rows, tiny_tokenizer, "alpaca", rep, max_seq_len=128)


def _separate_loss_sum(model, examples):
    """Reference: each sample alone, full logits, standard shift, response positions only."""
    import torch
    from torch.nn import functional as F

    total = 0.0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(ex.labels[1:])
        keep = labels != IGNORE
        total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
    return total


def test_packed_loss_equals_sum_of_separate_losses(model_and_examples):
    import torch

    from sftjob_trainer.loss import SelectiveLossLM

    model, examples = model_and_examples
    wrapped = SelectiveLossLM(model).eval()
    batch = collate([[0, 1, 2, 3]], examples, pad_id=0)  # all four samples in one row
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed, n = wrapped(batch["input_ids"], batch["position_ids"], batch["targets"])
    assert n == sum(ex.n_labels - (ex.labels[0] != IGNORE) for ex in examples)
    assert packed.item() == pytest.approx(_separate_loss_sum(model, examples), rel=1e-5)
    # also with padding rows and chunked loss (chunk smaller than the label count)
    batch2 = collate([[0, 1], [2], [3]], examples, pad_id=0)
    with torch.no_grad():
        chunked, _ = SelectiveLossLM(model, chunk=7)(
            batch2["input_ids"], batch2["position_ids"], batch2["targets"]
        )
    assert chunked.item() == pytest.approx(packed.item(), rel=1e-5)


def test_trap_cache_on_lets_samples_attend_to_each_other(model_and_examples):
    """The same packed row with use_cache=True leaks attention across samples: proof the test can bite."""
    import torch

    model, examples = model_and_examples
    batch = collate([[0, 1, 2, 3]], examples, pad_id=0)
    ids, pos = batch["input_ids"], batch["position_ids"]
    n0 = len(examples[0].input_ids)
    with torch.no_grad():
        clean = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        leaky = model(input_ids=ids, position_ids=pos, use_cache=True).logits
        alone = model(input_ids=ids[:, n0 : n0 + len(examples[1].input_ids)]).logits
    second = slice(n0, n0 + len(examples[1].input_ids))
    assert torch.allclose(clean[0, second], alone[0], atol=1e-4)
    assert (leaky[0, second] - alone[0]).abs().max() > 1e-2


def test_gradients_match_between_packed_and_separate(model_and_examples):
    from sftjob_trainer.loss import SelectiveLossLM

    model, examples = model_and_examples
    wrapped = SelectiveLossLM(model)
    w = model.model.layers[0].self_attn.q_proj.weight

    def grad(rows):
        model.zero_grad()
        for r in rows:
            b = collate([r], examples, pad_id=0)
            wrapped(b["input_ids"], b["position_ids"], b["targets"])[0].backward()
        return w.grad.clone()

    import torch

    assert torch.allclose(grad([[0, 1, 2, 3]]), grad([[0], [1], [2], [3]]), atol=1e-6, rtol=1e-4)
