"""The eval stage against an independent computation, and its gate exit code (tiny model, real code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import stage_config, write_json

pytestmark = pytest.mark.trainer


def unique_rows(n: int, seed: int) -> list[dict[str, str]]:
    from trainer.tiny import dataset_rows

    seen, out = set(), []
    for r in dataset_rows(4 * n, seed=seed):
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out[:n]


def chat(tok, row, answer: str | None):
    msgs = [{"role": "user", "content": row["instruction"] + "\n\n" + row["input"]}]
    if answer is None:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = tok.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(model, tok, ids: list[int], n: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            use_cache=True,
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def mean_answer_loss(model, tok, rows) -> float:
    """Plain forward pass, loss over every token after the generation prompt (the answer + end of turn)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p, full = chat(tok, r, None), chat(tok, r, r["output"])
            assert full[: len(p)] == p
            logits = model(input_ids=torch.tensor([full])).logits[0]
            tgt = torch.tensor(full[len(p) :])
            total += float(F.cross_entropy(logits[len(p) - 1 : len(full) - 1].float(), tgt, reduction="sum"))
            count += len(tgt)
    return total / count


@pytest.fixture
def eval_setup(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """Output root holding adapter/, and an eval file where every other reference is the adapted model's
    own greedy answer (so exact match is known to be about one half by construction)."""
    import shutil

    from peft import PeftModel
    from trainer.tiny import write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    shutil.copytree(tiny_adapter_dir, out / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir
    ).eval()
    rows = unique_rows(16, seed=11)
    planted = 0
    for i, r in enumerate(rows):
        if i % 2 == 0:
            own = greedy(model, tok, chat(tok, r, None), 8).strip()
            if own:
                r["output"] = own
                planted += 1
    train = write_jsonl(str(tmp_path / "train.jsonl"), unique_rows(40, seed=3))
    ev = write_jsonl(str(tmp_path / "eval.jsonl"), rows)
    cfg = stage_config(tiny_model_dir, str(out), str(tmp_path / "work"), train, ev)
    return cfg, model, tok, rows, planted


def test_eval_matches_independent_computation(eval_setup):
    from sftjob_trainer import eval_stage
    from sftjob_trainer.config import parse_config
    from sftjob_trainer.eval_metrics import exact_match, rouge_l

    cfg, model, tok, rows, planted = eval_setup
    term = cfg["runtime"]["workDir"] + "-termination-log"
    cfg["runtime"]["terminationLog"] = term
    assert eval_stage.main(parse_config(cfg)) == 0
    root = cfg["run"]["outputRoot"]
    with open(os.path.join(root, "eval", "results.json")) as f:
        res = json.load(f)

    assert res["trained"]["eval_loss"] == pytest.approx(mean_answer_loss(model, tok, rows), rel=1e-4)
    with model.disable_adapter():
        assert res["base"]["eval_loss"] == pytest.approx(mean_answer_loss(model, tok, rows), rel=1e-4)
        base_preds = [greedy(model, tok, chat(tok, r, None), 8) for r in rows]
    assert res["trained"]["perplexity"] == pytest.approx(2.718281828 ** res["trained"]["eval_loss"], rel=1e-6)
    assert res["base"]["eval_loss"] != pytest.approx(res["trained"]["eval_loss"], rel=1e-3)  # adapter matters

    preds = [greedy(model, tok, chat(tok, r, None), 8) for r in rows]
    em = sum(exact_match(p, r["output"]) for p, r in zip(preds, rows, strict=True)) / len(rows)
    rl = sum(rouge_l(p, r["output"]) for p, r in zip(preds, rows, strict=True)) / len(rows)
    assert planted >= 4 and em >= planted / len(rows)  # the planted answers are matched
    assert res["trained"]["exact_match"] == pytest.approx(em)
    assert res["trained"]["rouge_l"] == pytest.approx(rl)
    base_em = sum(exact_match(p, r["output"]) for p, r in zip(base_preds, rows, strict=True)) / len(rows)
    assert res["base"]["exact_match"] == pytest.approx(base_em)
    assert res["trained"]["generated"] == len(rows) and res["gates_passed"] is True
    assert res["status"]["exactMatch"] == pytest.approx(em) and res["status"]["gatesPassed"] is True

    with open(term) as f:  # what the operator parses into status.evalResults
        assert json.load(f) == {"evalResults": res["status"]}
    with open(os.path.join(root, "eval", "samples.jsonl")) as f:
        samples = [json.loads(x) for x in f]
    assert [s["trained"] for s in samples] == preds


def test_failed_gate_exits_with_eval_gate_failed(eval_setup, tmp_path):
    from sftjob_api.exit_codes import ExitCode

    cfg = eval_setup[0]
    cfg["eval"] = {**cfg["eval"], "gates": {"minExactMatch": 0.99, "maxEvalLoss": 100.0}}
    path = write_json(str(tmp_path / "gate.json"), cfg)
    term = tmp_path / "termination-log"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SFTJOB_TERMINATION_LOG": str(term),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "eval", "--config", path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == ExitCode.EVAL_GATE_FAILED == 3, proc.stderr[-3000:]
    root = cfg["run"]["outputRoot"]
    with open(os.path.join(root, "eval", "results.json")) as f:
        res = json.load(f)
    assert res["gates_passed"] is False
    assert len(res["failed_gates"]) == 1 and res["failed_gates"][0].startswith("minExactMatch: ")
    assert res["status"]["failedGates"] == res["failed_gates"]
    assert "minExactMatch: " in term.read_text()  # the operator's EvalGateFailed message
    # the run ends here: the manifest is written and lists the adapter and the eval results
    with open(os.path.join(root, "manifest.json")) as f:
        paths = {x["path"] for x in json.load(f)["files"]}
    assert "eval/results.json" in paths and "adapter/adapter_model.safetensors" in paths
