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


def test_step_counts_equal_what_collate_counts():
    from sftjob_trainer.packing import step_counts

    exs = [
        Example([1, 2, 3], [IGNORE, 2, 3]),
        Example([4, 5], [4, 5]),
        Example([6, 7, 8, 9], [IGNORE] * 2 + [8, 9]),
    ]
    mbs = [[[0, 1]], [[2], [1]]]
    batches = [collate(mb, exs, pad_id=0) for mb in mbs]
    labels = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    assert labels == sum(len(b["label_pos"]) for b in batches) == 6
    assert step_counts(mbs, exs) == (labels, sum(b["real_tokens"] for b in batches)) == (6, 11)


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
    with torch.no_grad():  # the trainer's call: labelled positions from collate (no boolean mask on device)
        by_pos, n_pos = wrapped(
            batch["input_ids"], batch["position_ids"], batch["targets"], batch["label_pos"]
        )
    assert (by_pos.item(), n_pos) == (packed.item(), n)
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


def test_training_attention_is_sdpa_flex_is_opt_in_on_cuda_and_the_override_is_checked():
    from sftjob_api.exit_codes import PermanentError
    from sftjob_trainer.model import training_attention

    assert training_attention(on_gpu=False) == "sdpa"
    assert training_attention(on_gpu=True) == "sdpa"  # until the GPU check has run FlexAttention
    assert training_attention(on_gpu=True, override="flex_attention") == "flex_attention"
    assert training_attention(on_gpu=True, override="sdpa") == "sdpa"
    with pytest.raises(PermanentError, match="SFTJOB_ATTENTION='flash'"):
        training_attention(on_gpu=True, override="flash")
    with pytest.raises(PermanentError, match="needs a GPU"):  # torch has no FlexAttention backward on CPU
        training_attention(on_gpu=False, override="flex_attention")


def test_flex_attention_document_mask_equals_separate_losses_and_the_sdpa_path(
    tiny_model_dir, model_and_examples, monkeypatch
):
    """FlexAttention (the trainer's choice on CUDA) keeps packed samples apart exactly like the SDPA path.

    Forward only: torch 2.13 has no FlexAttention backward on CPU (the GPU check compares the two paths'
    training losses). transformers wraps flex_attention in torch.compile (inductor: ~30 s cold on this
    machine); the test calls torch's flex_attention directly instead (its unfused reference). What is under
    test is the document mask transformers builds from the restarting position ids, the same either way."""
    import torch
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex
    from transformers import AutoModelForCausalLM

    from sftjob_trainer.loss import SelectiveLossLM

    monkeypatch.setattr(
        hf_flex,
        "compile_friendly_flex_attention",
        lambda q, k, v, training=False, **kw: torch_flex.flex_attention(q, k, v, **kw),
    )
    sdpa, examples = model_and_examples
    flex = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    assert flex.config._attn_implementation == "flex_attention"
    row = collate([[0, 1, 2, 3]], examples, pad_id=0)  # all four samples in one row
    padded = collate([[0, 1], [2], [3]], examples, pad_id=0)  # padding is a sample of its own
    with torch.no_grad():
        packed, _ = SelectiveLossLM(flex)(
            row["input_ids"], row["position_ids"], row["targets"], row["label_pos"]
        )
        assert packed.item() == pytest.approx(_separate_loss_sum(sdpa, examples), rel=1e-5)
        h_flex = flex.model(
            input_ids=padded["input_ids"], position_ids=padded["position_ids"]
        ).last_hidden_state
        h_sdpa = sdpa.model(
            input_ids=padded["input_ids"], position_ids=padded["position_ids"]
        ).last_hidden_state
        assert torch.allclose(h_flex, h_sdpa, atol=1e-5)
        # the bite: one document over the whole row (positions 0..L-1) lets the samples attend to each other
        one_doc = torch.arange(row["input_ids"].shape[1])[None]
        leaky, _ = SelectiveLossLM(flex)(row["input_ids"], one_doc, row["targets"], row["label_pos"])
    assert abs(leaky.item() - packed.item()) > 20 * 1e-5 * packed.item()  # measured: ~80x the tolerance
