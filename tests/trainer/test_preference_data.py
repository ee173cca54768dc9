"""The align stage's preference pairs (sftjob_trainer/preference_data.py): both formats and field mapping,
token ids equal to the SFT path's, every drop reason counted with file:line, bad and empty files as
PermanentError, left truncation, the seeded held-out split and decontamination. Real files, the real (tiny)
tokenizer, no model."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from sftjob_api.exit_codes import PermanentError
from sftjob_trainer.config import parse_config
from sftjob_trainer.data import IGNORE, build_examples
from sftjob_trainer.preference_data import load_preference_data
from sftjob_trainer.records import DropReport, Row

from .tiny import write_jsonl

pytestmark = pytest.mark.trainer

VOCAB = [f"w{i}" for i in range(300)]


def config(tmp_path: Any, model_dir: str, align: dict[str, Any], seed: int = 7, **dataset: Any) -> Any:
    """A trainer config whose spec.alignment.dataset is `align` (spec.dataset is not read unless it has
    curation or its maxSeqLength is the default)."""
    out = str(tmp_path / "out")
    return parse_config(
        {
            "run": {"namespace": "ns", "name": "a", "outputRoot": f"{out}/ns/a"},
            "model": {"uri": model_dir},
            "dataset": {
                "train": ["/unused.jsonl"],
                "format": "prompt_completion",
                "maxSeqLength": 512,
                **dataset,
            },
            "method": {"type": "lora"},
            "training": {"seed": seed},
            "output": {"uri": out},
            "runtime": {"metricsPort": 0, "workDir": str(tmp_path / "work")},
            "alignment": {"dataset": align},
        }
    )


def jsonl(path: Any, lines: list[Any]) -> str:
    """Rows (dicts) and raw lines (str) in order: line i+1 is lines[i]."""
    with open(path, "w") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return str(path)


def sft(tok: Any, row: dict[str, Any], fmt: str) -> tuple[list[int], list[int]]:
    """The SFT path's (input ids, trained ids) for one row."""
    [ex] = build_examples([Row(row, "x:1")], tok, fmt, DropReport(), max_seq_len=4096, dedup=False)
    return ex.input_ids, [t for t in ex.labels if t != IGNORE]


def by_origin(data: Any) -> dict[str, Any]:
    return {p.origin: p for p in data.train + data.eval}


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choices(VOCAB, k=k))


def test_preference_pairs_are_the_sft_path_token_ids(tmp_path, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [{"role": "system", "content": "be short"}, {"role": "user", "content": "count one two"}]
    rows = [
        {"prompt": "repeat red cat", "chosen": "red cat", "rejected": "cat red"},
        {"prompt": turns, "chosen": "two", "rejected": "three"},
    ]
    path = jsonl(tmp_path / "p.jsonl", rows)
    pairs = by_origin(load_preference_data(config(tmp_path, tiny_model_dir, {"train": [path]}), tok))
    assert set(pairs) == {f"{path}:1", f"{path}:2"}
    for line, row in enumerate(rows, start=1):
        pair = pairs[f"{path}:{line}"]
        for resp, ids in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
            if isinstance(row["prompt"], str):
                full, trained = sft(tok, {"prompt": row["prompt"], "completion": resp}, "prompt_completion")
            else:
                conv = [*row["prompt"], {"role": "assistant", "content": resp}]
                full, trained = sft(tok, {"messages": conv}, "messages")
            assert pair.prompt + ids == full and ids == trained
            assert tok.decode(ids) == resp + "<|im_end|>\n"  # ends as a trained SFT answer does
    assert tok.decode(pairs[f"{path}:2"].prompt).endswith("count one two<|im_end|>\n<|im_start|>assistant\n")


def test_without_a_chat_template_pairs_are_the_raw_sft_text(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None  # SFT then trains prompt + response + EOS as raw text
    row = {"prompt": "repeat red cat\n", "chosen": "red cat", "rejected": "cat red"}
    path = jsonl(
        tmp_path / "p.jsonl",
        [
            row,
            {"prompt": "repeat r", "chosen": "ed cat", "rejected": " blue"},  # " re"+"d" vs " r"+" blue"
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": "a",
                "rejected": "b",
            },  # needs a template
        ],
    )
    data = load_preference_data(config(tmp_path, tiny_model_dir, {"train": [path], "eval": [path]}), tok)
    [pair] = data.train
    for resp, ids in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
        full, trained = sft(tok, {"prompt": row["prompt"], "completion": resp}, "prompt_completion")
        assert pair.prompt + ids == full and ids == trained and tok.decode(ids) == resp + "</s>"
    ex = data.report["files"][path]["examples"]
    assert ex["prompt_tokenization_differs"] == [f"{path}:2: a token spans the prompt/response boundary"]
    assert ex["template_error"][0].startswith(
        f"{path}:3: messages format needs a tokenizer with a chat template"
    )
    tok.eos_token = None  # nothing marks the end: a response inside the prompt's last token trains nothing
    lost = jsonl(tmp_path / "lost.jsonl", [row, {"prompt": "repeat r", "chosen": "e", "rejected": "ed cat"}])
    data = load_preference_data(config(tmp_path, tiny_model_dir, {"train": [lost], "eval": [lost]}), tok)
    assert data.report["files"][lost]["examples"]["no_trainable_tokens"] == [
        f"{lost}:2: no response token survived tokenization"
    ]


def test_preference_messages_shared_turns_are_the_prompt(tmp_path, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    shared = [
        {"role": "user", "content": "repeat red cat"},
        {"role": "assistant", "content": "red cat"},
        {"role": "user", "content": "reverse one two"},
    ]
    chosen = [*shared, {"role": "assistant", "content": "two one"}]
    rejected = [*shared, {"role": "assistant", "content": "one two"}]
    msgs = jsonl(tmp_path / "m.jsonl", [{"chosen": chosen, "rejected": rejected}])
    flat = jsonl(tmp_path / "f.jsonl", [{"prompt": shared, "chosen": "two one", "rejected": "one two"}])
    [m] = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [msgs], "format": "preference_messages"}), tok
    ).train
    [f] = load_preference_data(config(tmp_path, tiny_model_dir, {"train": [flat]}), tok).train
    full, trained = sft(tok, {"messages": chosen}, "messages")
    assert m.prompt + m.chosen == full
    # SFT trains both assistant turns; the pair's response is only the last, the earlier one is prompt
    assert trained == sft(tok, {"messages": chosen[:2]}, "messages")[1] + m.chosen
    assert tok.decode(m.chosen) == "two one<|im_end|>\n" and tok.decode(m.rejected) == "one two<|im_end|>\n"
    assert "red cat<|im_end|>" in tok.decode(m.prompt)
    assert (f.prompt, f.chosen, f.rejected) == (m.prompt, m.chosen, m.rejected)


def test_field_mapping_renames_the_columns(tmp_path, tiny_model_dir, tiny_tokenizer):
    good = {"q": "repeat red", "good": "red", "bad": "blue"}
    path = jsonl(tmp_path / "p.jsonl", [good, {"prompt": "repeat red", "chosen": "red", "rejected": "blue"}])
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    data = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [path], "eval": [path], "fieldMapping": mapping}),
        tiny_tokenizer,
    )
    [pair] = data.train
    assert pair.origin == f"{path}:1" and tiny_tokenizer.decode(pair.chosen) == "red<|im_end|>\n"
    assert data.report["files"][path]["examples"]["missing_field"] == [f"{path}:2: missing field 'q'"]
    conv = [{"role": "user", "content": "hi"}]
    msgs = jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "win": [*conv, {"role": "assistant", "content": "red"}],
                "lose": [*conv, {"role": "assistant", "content": "blue"}],
            }
        ],
    )
    spec = {
        "train": [msgs],
        "eval": [msgs],
        "format": "preference_messages",
        "fieldMapping": {"chosen": "win", "rejected": "lose"},
    }
    [m] = load_preference_data(config(tmp_path, tiny_model_dir, spec), tiny_tokenizer).train
    assert tiny_tokenizer.decode(m.rejected) == "blue<|im_end|>\n"


def test_parquet_conversations_and_row_numbers(tmp_path, tiny_model_dir, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    user = {"role": "user", "content": "repeat red"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "red"}],
            "rejected": [user, {"role": "assistant", "content": "blue"}],
        },
        {"chosen": None, "rejected": [user, {"role": "assistant", "content": "blue"}]},
    ]
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [path], "eval": [path], "format": "preference_messages"}),
        tiny_tokenizer,
    )
    [pair] = data.train
    flat = jsonl(tmp_path / "f.jsonl", [{"prompt": "repeat red", "chosen": "red", "rejected": "blue"}])
    [same] = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [flat], "eval": [flat]}), tiny_tokenizer
    ).train
    assert pair.origin == f"{path}:1" and (pair.prompt, pair.chosen, pair.rejected) == (
        same.prompt,
        same.chosen,
        same.rejected,
    )
    assert data.report["files"][path]["examples"]["missing_field"] == [f"{path}:2: missing field 'chosen'"]


def test_every_drop_reason_is_counted_with_file_and_line(tmp_path, tiny_model_dir, tiny_tokenizer):
    ok = {"prompt": "repeat red", "chosen": "red", "rejected": "blue"}
    pref = jsonl(
        tmp_path / "p.jsonl",
        [
            ok,  # 1
            dict(ok),  # 2 duplicate
            '{"prompt": "x", "chosen": ',  # 3
            {"prompt": "p", "chosen": "c"},  # 4
            {"prompt": 5, "chosen": "c", "rejected": "r"},  # 5
            {"prompt": "  ", "chosen": "c", "rejected": "r"},  # 6
            {"prompt": "p", "chosen": "", "rejected": "r"},  # 7
            {"prompt": "p", "chosen": "same", "rejected": "same"},  # 8
            {"prompt": "p", "chosen": " ".join(["red"] * 40), "rejected": "r"},  # 9: 81 tokens > 32
            {"prompt": "repeat cat", "chosen": "cat", "rejected": "dog"},  # 10
            "[1, 2]",  # 11
            {"prompt": "p", "chosen": ["x"], "rejected": "r"},  # 12
        ],
    )
    user = {"role": "user", "content": "hi"}

    def a(text: str) -> dict[str, str]:
        return {"role": "assistant", "content": text}

    msgs = jsonl(
        tmp_path / "m.jsonl",
        [
            {"chosen": [user, a("red")], "rejected": [user, a("blue")]},  # 1
            {"chosen": [user, a("red")], "rejected": [user, a("blue"), user]},  # 2
            {"chosen": [user, a("red")], "rejected": [{"role": "user", "content": "ho"}, a("blue")]},  # 3
            {"chosen": "red", "rejected": [user, a("blue")]},  # 4
            {"chosen": [a("red")], "rejected": [a("blue")]},  # 5: no prompt turn
        ],
    )
    data = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [pref], "eval": [pref], "maxSeqLength": 32}),
        tiny_tokenizer,
    )
    f = data.report["files"][pref]
    assert f["dropped"] == {
        "duplicate": 1,
        "malformed_json": 2,
        "missing_field": 1,
        "wrong_type": 2,
        "empty_prompt": 1,
        "empty_response": 1,
        "chosen_equals_rejected": 1,
        "too_long": 1,
    }
    assert (f["total_rows"], f["kept_rows"], f["split"]) == (12, 2, "train")
    assert [p.origin for p in data.train] == [f"{pref}:1", f"{pref}:10"]
    ex = f["examples"]
    assert ex["duplicate"] == [f"{pref}:2: same as {pref}:1"]
    assert [e.split(": ")[0] for e in ex["malformed_json"]] == [f"{pref}:3", f"{pref}:11"]
    assert ex["missing_field"] == [f"{pref}:4: missing field 'rejected'"]
    assert ex["wrong_type"][0].startswith(f"{pref}:5: field 'prompt' is int")
    assert ex["wrong_type"][1].startswith(f"{pref}:12: field 'chosen' is list")
    assert [
        e.split(": ")[0] for r in ("empty_prompt", "empty_response", "chosen_equals_rejected") for e in ex[r]
    ] == [
        f"{pref}:6",
        f"{pref}:7",
        f"{pref}:8",
    ]
    assert ex["too_long"] == [f"{pref}:9: a 81-token response leaves no room in maxSeqLength 32"]
    # the same file as eval: counted under its own entry, and in the totals
    assert data.report["files"][f"{pref} (eval)"]["dropped"]["too_long"] == 1
    assert data.report["dropped"]["too_long"] == 2 and data.report["total_rows"] == 24

    m = load_preference_data(
        config(tmp_path, tiny_model_dir, {"train": [msgs], "eval": [msgs], "format": "preference_messages"}),
        tiny_tokenizer,
    ).report["files"][msgs]
    assert m["dropped"] == {
        "last_turn_not_assistant": 1,
        "conversations_differ": 1,
        "wrong_type": 1,
        "empty_prompt": 1,
    }
    assert m["examples"]["last_turn_not_assistant"] == [
        f"{msgs}:2: the last turn of 'rejected' is 'user', not 'assistant'"
    ]
    assert m["examples"]["conversations_differ"][0].startswith(
        f"{msgs}:3: 'chosen' and 'rejected' differ at turn 0"
    )
    assert m["examples"]["wrong_type"][0].startswith(f"{msgs}:4: field 'chosen' is str")
    assert m["examples"]["empty_prompt"] == [f"{msgs}:5: the prompt is empty"]


def test_a_file_without_usable_pairs_is_a_permanent_error_naming_counts_and_lines(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    bad = jsonl(
        tmp_path / "bad.jsonl",
        ["{not json", {"prompt": "p"}, {"prompt": "p", "chosen": "x", "rejected": "x"}],
    )
    with pytest.raises(PermanentError) as e:
        load_preference_data(config(tmp_path, tiny_model_dir, {"train": [bad]}), tiny_tokenizer)
    assert str(e.value).startswith(
        f"spec.alignment.dataset.train: no usable preference pairs in {bad}: 0/3 rows kept"
    )
    for part in (
        f"chosen_equals_rejected=1 (e.g. {bad}:3: ",
        f"malformed_json=1 (e.g. {bad}:1: ",
        f"missing_field=1 (e.g. {bad}:2: missing field 'chosen')",
    ):
        assert part in str(e.value)

    empty = jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(
        PermanentError, match=r"^spec.alignment.dataset.train: no preference pairs in .*empty"
    ):
        load_preference_data(config(tmp_path, tiny_model_dir, {"train": [empty]}), tiny_tokenizer)
    good = jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PermanentError, match=r"^spec.alignment.dataset.eval: no preference pairs in .*empty"):
        load_preference_data(
            config(tmp_path, tiny_model_dir, {"train": [good], "eval": [empty]}), tiny_tokenizer
        )
    with pytest.raises(
        PermanentError, match=r"^spec.alignment.dataset.train: dataset file not found: .*nope"
    ):
        load_preference_data(
            config(tmp_path, tiny_model_dir, {"train": [str(tmp_path / "nope.jsonl")]}), tiny_tokenizer
        )


def test_long_prompts_are_cut_from_the_left(tmp_path, tiny_model_dir, tiny_tokenizer):
    rng = random.Random(1)
    row = {"prompt": words(rng, 30), "chosen": words(rng, 8), "rejected": words(rng, 6)}
    path = jsonl(tmp_path / "p.jsonl", [row])

    def load(align_len: int | None, dataset_len: int = 4096) -> Any:
        spec = {"train": [path], "eval": [path], "maxSeqLength": align_len}
        return load_preference_data(
            config(tmp_path, tiny_model_dir, spec, maxSeqLength=dataset_len), tiny_tokenizer
        )

    [full] = load(None).train
    longer = max(len(full.chosen), len(full.rejected))
    assert len(full.chosen) > len(full.rejected) and len(full.prompt) > 20
    cut = load(longer + 5)
    [p] = cut.train
    assert (p.prompt, p.chosen, p.rejected) == (full.prompt[-5:], full.chosen, full.rejected)
    assert cut.report["truncated_prompts"] == 2 and cut.report["max_seq_length"] == longer + 5
    [d] = load(None, dataset_len=longer + 5).train  # alignment.dataset.maxSeqLength unset: spec.dataset's
    assert d == p
    with pytest.raises(PermanentError, match=r"too_long=1 .*-token response leaves no room in maxSeqLength"):
        load(longer)


def test_held_out_split_is_seeded_and_eval_files_replace_it(tmp_path, tiny_model_dir, tiny_tokenizer):
    rng = random.Random(2)
    rows = [
        {"prompt": f"q{i} " + words(rng, 3), "chosen": words(rng, 2), "rejected": words(rng, 2)}
        for i in range(40)
    ]
    path = jsonl(tmp_path / "p.jsonl", rows)

    def load(seed: int, **align: Any) -> Any:
        spec = {"train": [path], "evalSplit": 0.25, **align}
        return load_preference_data(config(tmp_path, tiny_model_dir, spec, seed=seed), tiny_tokenizer)

    a, b, c = load(7), load(7), load(8)
    assert (a.train, a.eval) == (b.train, b.eval)
    assert a.report["content_hash"] == b.report["content_hash"] != c.report["content_hash"]
    tr, ev = {p.origin for p in a.train}, {p.origin for p in a.eval}
    assert len(ev) == 10 and not tr & ev and tr | ev == {f"{path}:{i}" for i in range(1, 41)}
    assert {p.origin for p in c.eval} != ev
    assert a.report["eval_from"] == "split" and (a.report["train_pairs"], a.report["eval_pairs"]) == (30, 10)
    held = jsonl(tmp_path / "e.jsonl", [{"prompt": "held", "chosen": "yes", "rejected": "no"}])
    d = load(7, eval=[held])
    assert len(d.train) == 40 and [p.origin for p in d.eval] == [f"{held}:1"]


def test_decontamination_removes_pairs_that_contain_eval_text(tmp_path, tiny_model_dir, tiny_tokenizer):
    rng = random.Random(3)
    sft_eval = [{"prompt": "question " + words(rng, 14), "completion": words(rng, 10)} for _ in range(5)]
    sft_eval_path = write_jsonl(str(tmp_path / "sft-eval.jsonl"), sft_eval)
    pref_eval = [
        {"prompt": words(rng, 12), "chosen": words(rng, 12), "rejected": words(rng, 12)} for _ in range(3)
    ]
    pref_eval_path = jsonl(tmp_path / "pref-eval.jsonl", pref_eval)
    clean = [
        {"prompt": words(rng, 12), "chosen": words(rng, 6), "rejected": words(rng, 6)} for _ in range(20)
    ]
    leaks = [
        {"prompt": "please " + sft_eval[1]["prompt"], "chosen": "a", "rejected": "b"},  # an SFT eval prompt
        {
            "prompt": "tell me",
            "chosen": "c",
            "rejected": "Sure. " + pref_eval[0]["rejected"],
        },  # an eval pair's
        {"prompt": pref_eval[2]["prompt"].upper(), "chosen": "d", "rejected": "e"},  # rejected; its prompt
    ]
    train = jsonl(tmp_path / "t.jsonl", clean[:10] + leaks + clean[10:])
    align = {"train": [train], "eval": [pref_eval_path]}
    curated = {"eval": [sft_eval_path], "curation": {"decontamination": {"ngram": 8, "threshold": 0.5}}}

    data = load_preference_data(config(tmp_path, tiny_model_dir, align, **curated), tiny_tokenizer)
    c = data.report["contamination"]
    assert data.report["dropped"] == {"contaminated": 3} and len(data.train) == 20 and len(data.eval) == 3
    assert [h["train"] for h in c["examples"]] == [f"{train}:{n}" for n in (11, 12, 13)]
    assert [h["eval"] for h in c["examples"]] == [
        f"{sft_eval_path}:2",
        f"{pref_eval_path}:1",
        f"{pref_eval_path}:3",
    ]
    assert (c["eval_rows"], c["eval_rows_leaked"], c["train_rows_removed"]) == (8, 3, 3)
    plain = load_preference_data(
        config(tmp_path, tiny_model_dir, align, eval=[sft_eval_path]), tiny_tokenizer
    )
    assert len(plain.train) == 23 and plain.report["contamination"] is None
    gated = {**curated, "curation": {**curated["curation"], "maxContamination": 0.2}}
    with pytest.raises(PermanentError, match=r"data gate maxContamination: 3/8 eval rows"):
        load_preference_data(config(tmp_path, tiny_model_dir, align, **gated), tiny_tokenizer)

    # held out by the split: no training pair keeps the prompt of a held-out pair
    prompts = [words(rng, 12) for _ in range(30)]
    twins = [
        {"prompt": p, "chosen": words(rng, 4), "rejected": words(rng, 4)} for p in prompts for _ in (0, 1)
    ]
    path = jsonl(tmp_path / "twins.jsonl", twins)
    split = {"train": [path], "evalSplit": 0.2}
    before = load_preference_data(
        config(tmp_path, tiny_model_dir, split, eval=[sft_eval_path]), tiny_tokenizer
    )
    after = load_preference_data(config(tmp_path, tiny_model_dir, split, **curated), tiny_tokenizer)
    group = {f"{path}:{i + 1}": i // 2 for i in range(len(twins))}
    held = {group[p.origin] for p in before.eval}
    leaking = [p.origin for p in before.train if group[p.origin] in held]
    assert leaking and before.eval == after.eval
    assert [p.origin for p in after.train] == [p.origin for p in before.train if p.origin not in leaking]
    assert after.report["dropped"] == {"contaminated": len(leaking)}


def test_the_sft_dpo_examples_pairs_are_as_generated_and_all_kept(tmp_path):
    """examples/sftjob-sft-dpo.yaml's pairs: the committed files are the generator's output, and its
    alignment.dataset loads them with the real SmolLM2 tokenizer without a drop (half ask for capitals)."""
    import importlib.util
    from pathlib import Path

    import yaml
    from transformers import AutoTokenizer

    from sftjob_trainer.model_cache import resolve

    examples = Path(__file__).resolve().parents[2] / "examples"
    gen_spec = importlib.util.spec_from_file_location(
        "gen_pref", examples / "data" / "generate_preferences.py"
    )
    assert gen_spec and gen_spec.loader
    gen = importlib.util.module_from_spec(gen_spec)
    gen_spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, "run: python examples/data/generate_preferences.py"

    spec = yaml.safe_load((examples / "sftjob-sft-dpo.yaml").read_text())["spec"]
    align = spec["alignment"]["dataset"]
    align.update({k: [str(examples / p) for p in align[k]] for k in ("train", "eval")})
    model = resolve(spec["model"]["uri"])
    data = load_preference_data(
        config(tmp_path, model, align, format=spec["dataset"]["format"]), AutoTokenizer.from_pretrained(model)
    )
    assert data.report["dropped"] == {} and (len(data.train), len(data.eval)) == (gen.N_TRAIN, gen.N_EVAL)
    asks = [
        gen.UPPER in json.loads(x)["prompt"] for x in (examples / "data" / "preferences-eval.jsonl").open()
    ]
    assert sum(asks) == gen.N_EVAL // 2
