"""bitsandbytes' 8-bit AdamW state through the adapter format (bnb_state.py), on one real DeepSpeed rank
(stage 0, gloo, in this process) with real bitsandbytes on CPU: the raw state saved at a world size resumes
bit-exactly at that size; the fp32 moments alone (another size) resume within one 8-bit requantization.
The 2 -> 1 rank resume under ZeRO-3: tests/trainer/test_train_dist.py (qlora, adamw_8bit)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer

STEPS, MORE = 3, 2


def _engine(seed: int):
    import bitsandbytes as bnb
    import deepspeed
    import torch

    torch.manual_seed(seed)
    # 64 x 128 = 8192 elements: 8-bit blocks (bitsandbytes' min_8bit_size is 4096); the bias stays fp32
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1, bias=False))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _step(engine, i: int) -> None:
    import torch

    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(4, 128, generator=g), torch.randn(4, 1, generator=g)
    engine.backward(((engine(x) - y) ** 2).mean())
    engine.step()


def _weights(engine) -> list:
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.fixture
def one_rank(one_rank_in_process):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def test_8bit_state_resumes_exactly_at_the_same_size_and_within_requantization_elsewhere(one_rank):
    import torch

    from sftjob_trainer import bnb_state, portable

    ref = _engine(0)
    for i in range(STEPS):
        _step(ref, i)
    opt = portable.base(ref)
    [big] = [st for st in opt.state.values() if st["state1"].dtype == torch.uint8]
    saved = portable.gather(ref)
    raw = bnb_state.raw_state(ref, opt)
    # the saved moments are what bitsandbytes' next step dequantizes, and the 8-bit state is left as it was
    assert not any("exp_avg" in st for st in opt.state.values())
    import bitsandbytes.functional as F

    m = F.dequantize_blockwise(big["state1"], absmax=big["absmax1"], code=big["qmap1"], blocksize=256)
    assert torch.equal(saved["exp_avg/0.weight"], m.view(64, 128))
    for i in range(STEPS, STEPS + MORE):
        _step(ref, i)
    want = _weights(ref)

    def resumed(raw_8bit, tensors=saved) -> list:
        e = _engine(1)  # other initial weights: everything must come from the checkpoint
        portable.scatter(e, tensors, STEPS, raw_8bit)
        for i in range(STEPS, STEPS + MORE):
            _step(e, i)
        return _weights(e)

    # the same size: the raw state back, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(resumed(raw), want, strict=True))

    # another size (here the same layout, the fp32 moments quantized again): one more rounding to the nearest
    # 8-bit code of each moment. Measured: the weights ~3% of the two steps' movement off (each step moves
    # an element by up to ~lr = 1e-2), while a lost optimizer state (moments zero, the step kept) is off by
    # about as much as the steps moved them: 10% separates the two
    def off(got: list) -> float:
        return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))

    moved = max(float((a - b).abs().max()) for a, b in zip(want, saved_weights(saved), strict=True))
    requantized_weights = resumed(None)
    requantized = off(requantized_weights)
    # raw state of another layout (here: shapes that do not fit, as after a change of zeroStage) is not
    # forced in: the fp32 moments are requantized instead
    other_layout = {k: v.flatten()[:1] for k, v in raw.items()}
    assert all(torch.equal(a, b) for a, b in zip(resumed(other_layout), requantized_weights, strict=True))
    lost = off(resumed(None, {k: (v if k.startswith("param/") else 0 * v) for k, v in saved.items()}))
    print(
        f"{MORE} steps moved the weights up to {moved:.1e}; requantized {requantized:.1e} off, lost {lost:.1e}"
    )
    assert 0 < requantized < 0.1 * moved < lost


def saved_weights(saved: dict) -> list:
    return [saved["param/0.weight"], saved["param/0.bias"], saved["param/2.weight"]]
