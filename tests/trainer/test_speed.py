"""The speed levers of sftjob_trainer.speed keep the maths: ZeRO stage choice, the 16-bit-draw LoRA dropout,
and selective gradient checkpointing (gradients equal to no checkpointing, on the tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from sftjob_api.spec import LoraSpec, MethodSpec, TrainingSpec
from sftjob_trainer.loss import SelectiveLossLM
from sftjob_trainer.model import apply_method, load_base
from sftjob_trainer.speed import FastDropout, dropout_threshold, effective_zero_stage

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(
    ("stage", "world", "offload_params", "offload_opt", "expected"),
    [
        (3, 1, "none", "none", 0),  # one rank: nothing to partition
        (3, 2, "none", "none", 3),
        (3, 1, "cpu", "none", 3),  # offload needs ZeRO even on one rank
        (2, 1, "none", "cpu", 2),
        (0, 4, "none", "none", 0),
    ],
)
def test_effective_zero_stage(stage, world, offload_params, offload_opt, expected):
    assert effective_zero_stage(stage, world, offload_params, offload_opt) == expected


def test_fast_dropout_is_bernoulli_with_exact_expectation():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.ones(2000, 1000)
    y = d(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.002  # 2M draws: the standard error is 0.0002
    # both 16-bit halves of each 32-bit draw are used, and both drop at the same rate (standard error 0.0003)
    flat = (y == 0).flatten().float()
    assert abs(float(flat[0::2].mean()) - 0.1) < 0.002 and abs(float(flat[1::2].mean()) - 0.1) < 0.002
    odd_size = FastDropout(0.5).train()(torch.ones(3, 7))  # an odd count of elements: the last half unused
    assert odd_size.shape == (3, 7) and set(odd_size.unique().tolist()) <= {0.0, 2.0}
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - dropout_threshold(0.1) / 2**15)))
    assert abs(float(y.mean()) - 1.0) < 0.003
    assert d.eval()(x) is x


def test_fast_dropout_mask_is_replayed_by_checkpointing():
    """Non-reentrant checkpointing restores the CPU RNG before recomputing: same mask, same gradient."""
    from torch.utils.checkpoint import checkpoint

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    d = FastDropout(0.3).train()

    def f(inp):
        return (d(inp) @ w).tanh().sum()

    torch.manual_seed(1)
    f(x).backward()
    g_plain = w.grad.clone()
    w.grad = None
    torch.manual_seed(1)
    checkpoint(f, x, use_reentrant=False).backward()
    assert torch.equal(w.grad, g_plain)


def _lora(tiny_model_dir, gradient_checkpointing=False, checkpointing_policy="selective"):
    method = MethodSpec(type="lora", lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    training = TrainingSpec(
        gradient_checkpointing=gradient_checkpointing, checkpointing_policy=checkpointing_policy
    )
    torch.manual_seed(3)  # the same adapter initialisation for every model compared
    m = apply_method(load_base(tiny_model_dir, method, torch.float32), method, training)
    for name, p in m.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every lora_A gradient zero
            torch.nn.init.normal_(p, std=0.1)
    return m


def test_cpu_lora_uses_fast_dropout(tiny_model_dir):
    method = MethodSpec(type="lora", lora=LoraSpec(r=4, alpha=8, dropout=0.05))
    m = apply_method(
        load_base(tiny_model_dir, method, torch.float32), method, TrainingSpec(gradient_checkpointing=False)
    )
    lora_layers = [mod for mod in m.modules() if hasattr(mod, "lora_A")]
    fast = [mod for mod in m.modules() if isinstance(mod, FastDropout)]
    assert lora_layers and len(fast) == len(lora_layers)
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in m.modules())


def test_checkpointing_policies_keep_gradients_and_recompute_what_they_say(tiny_model_dir):
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(5, 200, (2, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two packed samples per row
    targets = torch.where(torch.rand(2, 24) < 0.5, ids, -100)

    def run(**kw):
        model = _lora(tiny_model_dir, **kw)
        model.enable_input_require_grads()  # as checkpointing does: layer 0's input gradient in every run
        w = SelectiveLossLM(model).train()
        # outermost dispatch mode: sees matmuls actually run, not those served from the checkpoint cache
        with FlopCounterMode(display=False) as flops:
            loss, _ = w(ids, pos, targets)
            loss.backward()
        return {n: p.grad for n, p in w.named_parameters() if p.requires_grad}, flops.get_total_flops()

    plain, flops_plain = run()
    flops = {}
    for policy in ("selective", "full"):
        grads, flops[policy] = run(gradient_checkpointing=True, checkpointing_policy=policy)
        assert grads.keys() == plain.keys() and len(plain) > 0
        for name, g in plain.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{policy}: {name}")
    # full recomputes every forward matmul; selective only LoRA's rank-4 up-projections (~6% of them)
    recomputed_full = flops["full"] - flops_plain
    recomputed_selective = flops["selective"] - flops_plain
    assert recomputed_full > 0.3 * flops_plain
    assert 0 < recomputed_selective < 0.15 * recomputed_full


def test_selective_policy_keeps_expensive_outputs_only():
    from sftjob_trainer.speed import must_save

    aten = torch.ops.aten
    x, w, lora_a, lora_b = (
        torch.empty(8, 576),
        torch.empty(576, 1536),
        torch.empty(576, 16),
        torch.empty(16, 576),
    )
    assert must_save(aten.mm.default, (x, w))  # base projection
    assert must_save(aten.mm.default, (x, lora_a))  # LoRA down-projection: its output is only r wide
    assert not must_save(aten.mm.default, (torch.empty(8, 16), lora_b))  # LoRA up-projection: cheap to redo
    assert must_save(aten.addmm.default, (torch.empty(1536), x, w))
    assert must_save(aten._scaled_dot_product_flash_attention_for_cpu.default, ())
    assert not must_save(aten.add.Tensor, (x, x))
