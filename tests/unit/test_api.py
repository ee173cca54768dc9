"""The SFTJob API models: valid examples parse, every invalid example is refused naming its field."""

from __future__ import annotations

import pytest
import yaml
from example_manifests import invalid_examples, valid_examples

from sftjob_api import SFTJob, SpecError, parse_sftjob, parse_spec
from sftjob_api.spec import SFTJobSpec


@pytest.mark.parametrize("path", valid_examples(), ids=lambda p: p.name)
def test_valid_examples_parse(path):
    job = parse_sftjob(yaml.safe_load(path.read_text()), str(path))
    assert job.metadata.name
    assert (
        job.spec.training.global_batch_size % (job.spec.training.micro_batch_size * job.spec.world_size())
        == 0
    )


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.stem)
def test_invalid_example_names_field_and_rule(example):
    with pytest.raises(SpecError) as exc:
        parse_sftjob(example.load(), str(example.path))
    lines = exc.value.errors
    matching = [line for line in lines if line.startswith(example.field + ":")]
    assert matching, f"no error names {example.field}: {lines}"
    if example.message:
        assert any(example.message in line for line in matching), lines
    assert str(example.path) in str(exc.value)


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec(
        {
            "model": {"uri": "smollm2-135m-instruct"},
            "dataset": {"train": ["/data/train.jsonl"]},
            "output": {"uri": "s3://bucket/runs"},
        }
    )
    assert spec.method.type == "qlora"
    assert spec.method.lora.target_modules == ["all-linear"]
    assert spec.training.scheduler == "cosine"
    assert spec.resources.deepspeed.zero_stage == 3
    assert spec.eval.metrics == ["loss", "perplexity", "rouge_l", "exact_match"]
    assert spec.world_size() == 1


def test_parse_spec_prefixes_paths_with_spec():
    with pytest.raises(SpecError) as exc:
        parse_spec({"model": {"uri": "x"}, "dataset": {"train": []}, "output": {"uri": "s3://bucket/p"}})
    assert exc.value.errors == [
        "spec.dataset.train: List should have at least 1 item after validation, not 0"
    ]


def test_snake_and_camel_case_both_accepted_and_camel_case_emitted():
    spec = SFTJobSpec.model_validate(
        {
            "model": {"uri": "m"},
            "dataset": {"train": ["/d.jsonl"], "max_seq_length": 512},
            "output": {"uri": "/out"},
        }
    )
    dumped = spec.model_dump(exclude_none=True)
    assert dumped["dataset"]["maxSeqLength"] == 512
    assert "max_seq_length" not in dumped["dataset"]


def test_world_size_counts_cpu_pods_as_one_rank():
    spec = parse_spec(
        {
            "model": {"uri": "m"},
            "dataset": {"train": ["/d.jsonl"]},
            "output": {"uri": "/out"},
            "resources": {"nodes": 3, "gpusPerNode": 0},
            "training": {"globalBatchSize": 12, "microBatchSize": 2},
        }
    )
    assert spec.world_size() == 3


def test_a_spec_wide_rule_names_its_field_once():
    # The rule sits on the whole spec; its error names spec.training.globalBatchSize (not "spec..training").
    with pytest.raises(SpecError) as e:
        parse_spec(
            {
                "model": {"uri": "m"},
                "dataset": {"train": ["/d.jsonl"]},
                "output": {"uri": "/out"},
                "resources": {"nodes": 3, "gpusPerNode": 0},
                "training": {"globalBatchSize": 10, "microBatchSize": 2},
            }
        )
    [error] = e.value.errors
    assert error.startswith("spec.training.globalBatchSize: "), error


def test_round_trip_through_the_wire_format():
    doc = yaml.safe_load(valid_examples()[-1].read_text())
    job = parse_sftjob(doc)
    again = SFTJob.model_validate(job.model_dump(mode="json"))
    assert again == job


def test_alignment_training_takes_its_own_settings_over_training():
    spec = parse_spec(
        {
            "model": {"uri": "smollm2-135m-instruct"},
            "dataset": {"train": ["/data/t.jsonl"]},
            "output": {"uri": "s3://bucket/runs"},
            "training": {"maxSteps": 12, "learningRate": 1e-3, "globalBatchSize": 8},
            "alignment": {
                "dataset": {"train": ["/data/pairs.jsonl"]},
                "training": {"maxSteps": 6, "globalBatchSize": 4, "microBatchSize": 1},
            },
        }
    )
    t = spec.alignment_training()
    assert (t.max_steps, t.global_batch_size, t.micro_batch_size) == (6, 4, 1)
    assert t.learning_rate == pytest.approx(1e-4) and t.epochs is None  # a tenth of training's
