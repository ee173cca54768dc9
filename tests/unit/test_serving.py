"""The serving hand-off rules (sftjob_api.serving): what each server cannot load, the hand-off each spec
gets (adapter, merged model, full model), and the refusal when there is nothing loadable to hand off."""

from __future__ import annotations

import json

import pytest
from example_manifests import SERVING_INCOMPATIBLE, serving_manifest

from sftjob_api import SpecError, parse_sftjob
from sftjob_api.crd import build_crd
from sftjob_api.layout import handoff, status_artifacts
from sftjob_api.serving import (
    RULES,
    VLLM_MAX_LORA_RANKS,
    adapter_config_problems,
    cel_rules,
    lora_problems,
    smallest_max_lora_rank,
)
from sftjob_api.spec import LoraSpec

INCOMPATIBLE = SERVING_INCOMPATIBLE
doc = serving_manifest


def test_serving_defaults_to_none_and_none_checks_nothing():
    spec = parse_sftjob(doc("none", {"useDora": True, "r": 1024}, merge=False)).spec
    assert spec.output.serving == "none"
    del_serving = doc("none")
    del del_serving["spec"]["output"]["serving"]
    assert parse_sftjob(del_serving).spec.output.serving == "none"
    h = handoff(spec, "s3://artifacts/sft/ns/serve/")
    assert (h.artifact, h.uri, h.message) == ("adapter", "s3://artifacts/sft/ns/serve/adapter/", "")


@pytest.mark.parametrize("server", ["vllm", "tgi"])
def test_the_default_adapter_and_the_llama_projections_are_loadable(server):
    assert lora_problems(server, LoraSpec()) == []
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_problems(server, LoraSpec(target_modules=targets, r=64, use_rslora=True)) == []
    spec = parse_sftjob(doc(server, {"targetModules": targets}, merge=False)).spec
    assert handoff(spec, "r/").artifact == "adapter"


@pytest.mark.parametrize(("server", "lora", "field"), INCOMPATIBLE)
def test_incompatible_adapter_without_merge_is_refused_naming_field_and_reason(server, lora, field):
    with pytest.raises(SpecError) as exc:
        parse_sftjob(doc(server, lora, merge=False))
    [line] = [e for e in exc.value.errors if e.startswith(field + ":")]
    assert f"output.serving {server}: {RULES[server].title}" in line
    assert "merge.enabled is false" in line and "docs/serving.md" in line


@pytest.mark.parametrize(("server", "lora", "field"), INCOMPATIBLE)
def test_incompatible_adapter_with_merge_hands_off_the_merged_model(server, lora, field):
    spec = parse_sftjob(doc(server, lora, merge=True)).spec
    arts = status_artifacts(spec, "team-a", "serve")
    assert arts.serving is not None
    assert arts.serving.artifact == "merged"
    assert arts.serving.uri == arts.merged == "s3://artifacts/sft/team-a/serve/merged/"
    assert arts.serving.message.startswith("the merged model is handed off: " + field)
    assert arts.serving.manifest == "s3://artifacts/sft/team-a/serve/serving/serving.json"


def test_method_full_hands_off_the_model_whatever_the_lora_settings():
    spec = parse_sftjob(doc("vllm", {"useDora": True}, merge=False, method="full")).spec
    h = handoff(spec, "r/")
    assert (h.artifact, h.uri) == ("model", "r/model/")


def test_merge_uri_elsewhere_is_the_handoff_uri():
    d = doc("vllm", {"useDora": True})
    d["spec"]["merge"]["uri"] = "s3://serving/merged-serve"
    spec = parse_sftjob(d).spec
    assert handoff(spec, "r/").uri == "s3://serving/merged-serve"


def test_vllm_rank_limit_is_the_largest_max_lora_rank_choice():
    assert lora_problems("vllm", LoraSpec(r=512)) == []
    [p] = lora_problems("vllm", LoraSpec(r=513))
    assert p.field == "method.lora.r" and "512" in p.reason
    assert lora_problems("tgi", LoraSpec(r=1024)) == []  # TGI: no hard limit (slower kernels above 128)
    assert [smallest_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [
        1,
        8,
        8,
        16,
        16,
        32,
        320,
        512,
    ]
    assert VLLM_MAX_LORA_RANKS[-1] == 512


def test_several_problems_are_all_reported_in_the_handoff_message():
    spec = parse_sftjob(doc("vllm", {"useDora": True, "r": 1024})).spec
    msg = handoff(spec, "r/").message
    assert "spec.method.lora.useDora" in msg and "spec.method.lora.r" in msg


def test_every_rule_is_a_cel_rule_in_the_crd_with_its_field_path():
    text = json.dumps(build_crd())
    rules = cel_rules()
    assert len(rules) == 4 + 3  # vLLM: DoRA, modulesToSave, rank, targets; TGI: no rank limit
    for rule in rules:
        assert json.dumps(rule.cel)[1:-1] in text
        assert rule.field_path and rule.field_path.startswith(".method.lora.")


def test_adapter_config_rules_match_what_the_servers_check_on_load():
    ok = {"r": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": False, "modules_to_save": None}
    assert adapter_config_problems("vllm", ok) == [] and adapter_config_problems("tgi", ok) == []
    assert adapter_config_problems("none", {**ok, "use_dora": True}) == []
    bad = {**ok, "use_dora": True, "modules_to_save": ["lm_head"], "r": 1024, "bias": "all"}
    problems = adapter_config_problems("vllm", bad)
    assert [p.split(" ")[0].rstrip(":") for p in problems] == ["use_dora", "modules_to_save", "r", "bias"]
    # peft writes the resolved names (or full paths); the last component is what servers match
    assert (
        adapter_config_problems("vllm", {**ok, "target_modules": ["model.layers.0.self_attn.q_proj"]}) == []
    )
    assert adapter_config_problems("vllm", {**ok, "target_modules": ["lm_head"]})


def test_serving_examples_point_at_the_artifacts_the_example_sftjob_writes():
    import kubernetes_validate
    import yaml
    from example_manifests import EXAMPLES

    from sftjob_api.manifest import SERVING_MOUNT

    spec = parse_sftjob(yaml.safe_load((EXAMPLES / "sftjob-serving-vllm.yaml").read_text())).spec
    arts = status_artifacts(spec, "team-a", "serving-vllm")
    assert arts.serving is not None and arts.serving.artifact == "adapter"
    deployment, service = yaml.safe_load_all((EXAMPLES / "serving" / "vllm-lora.yaml").read_text())
    for obj in (deployment, service):
        kubernetes_validate.validate(obj, "1.34", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    assert f"s3 sync {arts.adapter} {SERVING_MOUNT}/adapter/" in pod["initContainers"][0]["args"][0]
    args = pod["containers"][0]["args"]
    assert args[args.index("--lora-modules") + 1] == f"serving-vllm={SERVING_MOUNT}/adapter"
    assert f"--max-lora-rank={smallest_max_lora_rank(spec.method.lora.r)}" in args
    assert f"--max-model-len={spec.dataset.max_seq_length}" in args
    isvc = yaml.safe_load((EXAMPLES / "serving" / "kserve-merged.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == arts.merged


def test_a_pvc_model_is_named_by_its_spec_reference_not_the_pod_path():
    from sftjob_operator.render.trainer_config import trainer_config

    d = serving_manifest("vllm")
    d["spec"]["model"]["uri"] = "pvc://models/smollm2"
    cfg = trainer_config("team-a", "serve", parse_sftjob(d).spec)
    assert cfg.model.uri == "/mnt/pvc/models/smollm2"  # where the pod reads it
    assert cfg.run.model_uri == "pvc://models/smollm2" == cfg.base_model_reference()
    plain = trainer_config("team-a", "serve", parse_sftjob(serving_manifest("vllm")).spec)
    assert plain.run.model_uri is None and plain.base_model_reference() == "s3://models/smollm2-135m-instruct"
