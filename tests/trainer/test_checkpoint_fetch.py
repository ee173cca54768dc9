"""Which checkpoint files each rank fetches on resume (`checkpoint.files_for_rank`, `adapter_files`), and which DeepSpeed config
makes the base model be built under ZeRO-3 init (`model.zero3_init`)."""

from __future__ import annotations

import pytest

from sftjob_api.spec import MethodSpec
from sftjob_trainer.checkpoint import adapter_files, files_for_rank
from sftjob_trainer.model import zero3_init
from sftjob_trainer.schedule import deepspeed_config

# what a 2-rank ZeRO-3 save_checkpoint plus our RNG files and marker put under checkpoints/<run>/step-N/ (deepspeed format: full fine-tuning)
ZERO3 = [
    "COMPLETE",
    "rng_rank0.json",
    "rng_rank1.json",
    "zero_pp_rank_0_mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_model_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
]


def test_zero3_rank_gets_its_own_partition_and_rng_only():
    assert files_for_rank(ZERO3, 1) == [
        "rng_rank1.json",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # every file but the marker is fetched by exactly one rank
    got = files_for_rank(ZERO3, 0) + files_for_rank(ZERO3, 1)
    assert sorted(got) == sorted(set(ZERO3) - {"COMPLETE"})


def test_adapter_format_raw_8bit_state_only_at_the_same_size():
    # adamw_8bit: every rank's raw 8-bit state is its partition's, so it is read back only at the same world
    # size (bit-exact); at another size the fp32 moments in the state file are requantized (bnb_state.py)
    names = ["COMPLETE", "adapter_state.safetensors", "rng_rank0.json", "rng_rank1.json"]
    raw = [f"bnb_state_rank{r}.safetensors" for r in (0, 1)]
    assert adapter_files(1, 2, 2, names + raw) == [
        "adapter_state.safetensors",
        "bnb_state_rank1.safetensors",
        "rng_rank1.json",
    ]
    assert adapter_files(0, 2, 1, names + raw) == ["adapter_state.safetensors", "rng_rank0.json"]
    assert adapter_files(2, 2, 3, names + raw) == ["adapter_state.safetensors", "rng_rank0.json"]
    assert adapter_files(1, 2, 2, names) == ["adapter_state.safetensors", "rng_rank1.json"]  # adamw


def test_shared_files_go_to_every_rank_and_rank_numbers_are_not_prefixes():
    # ZeRO-1/2 and stage 0: one model-states file (mp_rank is the model-parallel rank) read by all ranks;
    # bf16 mode prefixes the optimizer partitions; rank 1 must not take rank 10's or 11's files
    names = [
        "mp_rank_00_model_states.pt",
        "latest",
        *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1, 10, 11)),
        *(f"rng_rank{r}.json" for r in (0, 1, 10, 11)),
    ]
    assert files_for_rank(names, 1) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "latest",
        "mp_rank_00_model_states.pt",
        "rng_rank1.json",
    ]
    assert "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt" in files_for_rank(names, 10)
    assert files_for_rank(names, 2) == ["latest", "mp_rank_00_model_states.pt"]


def ds(stage: int) -> dict:
    return deepspeed_config(
        micro=1,
        accum=1,
        world=2,
        stage=stage,
        offload_optimizer="none",
        offload_params="none",
        bf16=False,
        fp16=False,
        grad_clip=1.0,
    )


@pytest.mark.parametrize(
    ("stage", "method", "expected"),
    [
        (3, "lora", True),
        (3, "full", True),
        (3, "qlora", False),  # transformers builds quantized models on the meta device, never zero.Init
        (2, "lora", False),
        (0, "full", False),
    ],
)
def test_zero3_init_only_where_it_applies(stage, method, expected):
    from transformers.integrations import is_deepspeed_zero3_enabled

    keep = zero3_init(ds(stage), MethodSpec(type=method))
    try:
        assert (keep is not None) == expected
        assert is_deepspeed_zero3_enabled() == expected  # what from_pretrained and peft consult
    finally:
        del keep
    assert not is_deepspeed_zero3_enabled()  # a weak reference: gone with the object


def test_one_rank_checkpoint_without_recorded_names_is_refused_not_retried(tmp_path):
    # a stage-0 checkpoint written before the optimizer's parameter names were recorded: its numbered Adam
    # state cannot be named per parameter, so another world size exits 2 (a retry would fail the same way)
    import torch

    from sftjob_api.exit_codes import PermanentError
    from sftjob_trainer import universal

    state = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0]}]}
    torch.save({"module": {"w": torch.zeros(2)}, "optimizer": state}, tmp_path / universal.UNPARTITIONED)
    with pytest.raises(PermanentError, match=universal.OPTIMIZER_PARAM_NAMES):
        universal.convert_unpartitioned(str(tmp_path), str(tmp_path / "out"))
