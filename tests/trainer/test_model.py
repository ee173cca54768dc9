"""Model loading and methods on the tiny Llama: qlora (real bitsandbytes 4-bit on CPU), lora with
DoRA/rsLoRA, full, NEFTune (no DeepSpeed here; the distributed tests cover that)."""

from __future__ import annotations

import pytest
import torch

from sftjob_api.spec import LoraSpec, MethodSpec, TrainingSpec
from sftjob_trainer.model import apply_method, load_base, load_tokenizer

pytestmark = pytest.mark.trainer


NO_CKPT = TrainingSpec(gradient_checkpointing=False)


def load(model_dir: str, method: MethodSpec):
    return apply_method(load_base(model_dir, method, torch.float32), method, NO_CKPT)


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_with_dora_and_rslora(tiny_model_dir):
    lora = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True)
    m = load(tiny_model_dir, MethodSpec(type="lora", lora=lora))
    cfg = m.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and cfg.r == 4 and set(cfg.target_modules) == {"q_proj", "v_proj"}
    names = trainable(m)
    assert names and all("lora_" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude is trained
    assert not any("k_proj" in n for n in names)


def test_full_trains_everything(tiny_model_dir):
    m = load(tiny_model_dir, MethodSpec(type="full"))
    assert len(trainable(m)) == len(list(m.parameters()))


def test_qlora_is_4bit_with_cpu_repack_disabled(tiny_model_dir):
    import bitsandbytes as bnb

    method = MethodSpec(type="qlora", lora=LoraSpec(r=4, alpha=8))
    base = load_base(tiny_model_dir, method, torch.float32)
    q = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q) == 14 and all(m.support_avx512bf16_for_cpu is False for m in q)
    assert q[0].weight.quant_type == "nf4" and q[0].weight.quant_state.nested  # double quant
    assert q[0].weight.dtype == torch.float32  # quant storage = compute dtype (ZeRO-3 partitions it)
    m = apply_method(base, method, NO_CKPT)
    names = trainable(m)
    assert names and all("lora_" in n for n in names)
    out = m(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)
    assert torch.isfinite(out.logits).all()


def test_neftune_noise_only_in_training(tiny_model_dir):
    from sftjob_trainer.loss import SelectiveLossLM

    m = load(tiny_model_dir, MethodSpec(type="lora"))
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    pos = torch.arange(6)[None]
    tgt = torch.tensor([[8, 9, 10, 11, 12, -100]])
    plain = SelectiveLossLM(m).eval()(ids, pos, tgt)[0]
    noisy = SelectiveLossLM(m, neftune_alpha=50.0)
    torch.manual_seed(0)
    assert noisy.eval()(ids, pos, tgt)[0].item() == pytest.approx(plain.item())
    noisy.train()
    m.eval()  # no dropout: any difference comes from the embedding noise
    assert noisy.training and noisy(ids, pos, tgt)[0].item() != pytest.approx(plain.item(), rel=1e-4)


def test_tokenizer_gets_pad_and_must_be_fast(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.is_fast and tok.pad_token_id is not None
