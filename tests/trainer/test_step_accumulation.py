"""The training step's logged loss and tokens, accumulated on the device, equal an independent reference.

`train.train_step` adds the micro-batch losses up on the device and reads them back once per step
(issue 27). This test runs the real setup (tiny Llama, LoRA, real DeepSpeed on one gloo rank, in this
process) for three optimizer steps of 4 micro-batches each and checks every step against a plain
transformers forward pass of the same samples, one at a time, on the weights the step started from:

- loss = sum of the samples' token losses / their label count (a per-micro-batch mean, a lost or doubled
  micro-batch, or an accumulator kept across steps moves it by far more than the fp32 tolerance);
- tokens = the samples' real tokens.
"""

from __future__ import annotations

import pytest

from .runner import make_config
from .tiny import dataset_rows, write_jsonl

pytestmark = pytest.mark.trainer


def _reference(model, examples, ids) -> tuple[float, int, int]:
    """(mean token loss, labels, real tokens) of these samples, each alone, full logits, standard shift."""
    import torch
    from torch.nn import functional as F

    from sftjob_trainer.data import IGNORE

    total, labels, tokens = 0.0, 0, 0
    with torch.no_grad():
        for i in ids:
            ex = examples[i]
            logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0, :-1]
            target = torch.tensor(ex.labels[1:])
            keep = target != IGNORE
            total += F.cross_entropy(logits[keep].double(), target[keep], reduction="sum").item()
            labels += int(keep.sum())
            tokens += len(ex.input_ids)
    return total / labels, labels, tokens


def test_logged_loss_and_tokens_equal_the_separate_forward_of_the_step_samples(
    tiny_model_dir, tmp_path, one_rank_in_process
):
    from sftjob_trainer.checkpoint import TrainState
    from sftjob_trainer.config import parse_config
    from sftjob_trainer.packing import epoch_order, micro_batches_for
    from sftjob_trainer.train import train_step
    from sftjob_trainer.train_setup import setup

    data = write_jsonl(str(tmp_path / "d.jsonl"), dataset_rows(120, seed=5))
    cfg = make_config(
        tiny_model_dir, data, str(tmp_path / "out"), str(tmp_path / "work"), global_batch=8, micro=1
    )
    s = setup(parse_config(cfg))
    assert (s.plan.micro, s.plan.accum) == (1, 8)  # 8 packed rows, one per micro-batch
    assert len(s.rows) >= 3 * s.plan.rows_per_step  # three steps inside epoch 0
    ordered = epoch_order(s.rows, cfg["training"]["seed"], 0)
    state = TrainState()
    for step in range(3):
        offset = step * s.plan.rows_per_step
        mbs = micro_batches_for(0, 1, offset, ordered, s.lengths, s.plan.micro, s.plan.accum)
        ids = [i for mb in mbs for r in mb for i in r]
        s.model.eval()  # the reference: dropout 0 anyway; eval only for transformers' own switches
        want_loss, _, want_tokens = _reference(s.model, s.examples, ids)
        s.engine.train()
        r = train_step(s, state, ordered, offset)
        state = TrainState(state.step + 1, state.samples + s.plan.rows_per_step, 0, r.loss)
        assert r.tokens == r.local_tokens == want_tokens, step
        assert r.loss == pytest.approx(want_loss, rel=1e-5), step
    assert not r.stop
