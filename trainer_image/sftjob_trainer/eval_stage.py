"""The eval stage: `python -m sftjob_trainer eval --config PATH`.

Loads the base model exactly as training did (4-bit for qlora) plus the trained adapter (or the trained full
model), and on the held-out examples (dataset.eval, or the same seeded split of the training data that
training held out) computes, for the base model *and* the trained one:

- eval loss / perplexity: mean token cross-entropy over labelled (answer) tokens only, with the training
  code's own tokenization, prompt masking (data.py) and label-position-only loss (loss.py);
- ROUGE-L and exact match (eval_metrics.py) of greedy generations for the first eval.maxSamples examples:
  the prompt is everything before the example's last labelled span, the reference is that span's text.

With spec.alignment the trained model is the aligned one (aligned/, Layout.final_weights): the SFT result it
started from is evaluated too (a second adapter on the same base model, or model/ for `full`), and the
trained results add preference_accuracy and reward_margin on the held-out pairs, against the reference
log-probabilities the align stage stored, plus each model's own chosen_logp_accuracy (docs/alignment.md,
"Eval and gates").

Writes eval/results.json (plus `status`, shaped like SFTJob status.evalResults) and eval/samples.jsonl, then
checks spec.eval.gates against the trained model: exit 0 when they hold (and the termination message, if
configured, is `{"evalResults": {...}}`), EVAL_GATE_FAILED (3) otherwise (the message names the failed gates).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch

from sftjob_api import Layout, Stage
from sftjob_api.evaluation import EvalMetrics
from sftjob_api.exit_codes import EvalGateFailed, ExitCode, PermanentError
from sftjob_api.manifest import close_run
from sftjob_api.status import EvalResults
from sftjob_api.storage import Store, open_store
from sftjob_api.trainer_config import TrainerConfig

from .data import IGNORE, Example
from .dpo import chosen_logp_accuracy, load_pairs, pairs_digest, preference_scores
from .eval_metrics import generation_scores, loss_summary
from .loss import SelectiveLossLM
from .metrics import log_json
from .model import config_tokenizer, load_base, load_trained, model_dir, weights_dtype
from .packing import collate
from .pipeline import prepare_eval
from .tracking import Tracker, termination_message


@dataclass(frozen=True)
class Prompted:
    prompt_ids: list[int]
    reference_ids: list[int]


def last_span(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last contiguous run of labelled positions."""
    end = max(i for i, x in enumerate(labels) if x != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def to_prompted(ex: Example) -> Prompted:
    s, e = last_span(ex.labels)
    return Prompted(ex.input_ids[:s], ex.input_ids[s:e])


def length_batches(lengths: list[int], max_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """Indices grouped by similar length so that rows x longest <= max_tokens (at least one row each)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > max_tokens or len(cur) >= max_rows):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def loss_sum(model: Any, examples: list[Example], pad_id: int, max_tokens: int = 4096) -> tuple[float, int]:
    """(sum of token losses, labelled tokens) with the training loss code, one sample per row."""
    wrapper = SelectiveLossLM(model).eval()
    dev = next(model.parameters()).device  # inputs go where the model is (GPU when present)
    total, n = 0.0, 0
    with torch.no_grad():
        for idx in length_batches([len(e.input_ids) for e in examples], max_tokens):
            b = collate([[i] for i in idx], examples, pad_id)
            s, k = wrapper(*(b[name].to(dev) for name in ("input_ids", "position_ids", "targets")))
            total += float(s)
            n += int(k)
    return total, n


def generate(
    model: Any,
    tok: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    batch_size: int = 16,
) -> list[str]:
    """Greedy, left-padded batched generation; returns the decoded continuations (special tokens dropped)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    dev = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    for idx in length_batches([len(p) for p in prompts], 1 << 30, batch_size):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=eos_ids,
                pad_token_id=pad,
            )
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
    return out


def eos_token_ids(model: Any, tok: Any) -> list[int]:
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), tok.eos_token_id):
        for x in v if isinstance(v, list) else [v]:
            if x is not None and x not in ids:
                ids.append(int(x))
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):  # end-of-turn markers of common chat templates
        tid = tok.convert_tokens_to_ids(t) if t in tok.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


def evaluate_model(
    model: Any, tok: Any, examples: list[Example], metrics: list[str], max_samples: int, max_new_tokens: int
) -> tuple[dict[str, Any], list[str]]:
    """Metrics dict (eval_loss, perplexity, rouge_l, exact_match, counts) and the generations."""
    res: dict[str, Any] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if "loss" in metrics or "perplexity" in metrics:
        s, n = loss_sum(model, examples, pad)
        res.update(loss_summary(s, n))
    preds: list[str] = []
    if "rouge_l" in metrics or "exact_match" in metrics:
        sample = [to_prompted(e) for e in examples[:max_samples]]
        preds = generate(
            model, tok, [p.prompt_ids for p in sample], max_new_tokens, eos_token_ids(model, tok)
        )
        refs = [tok.decode(p.reference_ids, skip_special_tokens=True) for p in sample]
        res.update(generation_scores(preds, refs))
        res["generated"] = len(sample)
    keep = {"eval_tokens", "generated", *("eval_loss" if m == "loss" else m for m in metrics)}
    return {k: v for k, v in res.items() if k in keep}, preds


def metrics_of(res: dict[str, Any]) -> EvalMetrics:
    return EvalMetrics.model_validate({k: res.get(k) for k in EvalMetrics.model_fields})


@dataclass(frozen=True)
class Models:
    """The model under test and views of the models it is compared with. An adapter run holds one base
    model: the base is the adapter disabled, the SFT result (with spec.alignment) a second adapter on it."""

    trained: Any
    tok: Any
    as_base: Callable[[], ContextManager[Any]]
    as_sft: Callable[[], ContextManager[Any]] | None  # None: no alignment, the trained model is the SFT one


def fetch_weights(store: Store, key: str, work: str) -> str:
    local = os.path.join(work, key)
    if not store.download_dir(key, local):
        raise PermanentError(f"nothing under {key}/: did the stage that writes it finish?")
    return local


def as_is(model: Any) -> Callable[[], ContextManager[Any]]:
    @contextlib.contextmanager
    def view() -> Iterator[Any]:
        yield model

    return view


def with_adapter(model: Any, name: str) -> Callable[[], ContextManager[Any]]:
    """A view of a PeftModel with the adapter `name` active instead of the default one."""

    @contextlib.contextmanager
    def view() -> Iterator[Any]:
        model.set_adapter(name)
        try:
            yield model
        finally:
            model.set_adapter("default")

    return view


def load_models(cfg: TrainerConfig, store: Store, work: str) -> Models:
    on_gpu = torch.cuda.is_available()
    dtype = weights_dtype(cfg.method, on_gpu)
    base_dir = model_dir(cfg)
    tok = config_tokenizer(cfg, base_dir)
    model = load_trained(cfg, base_dir, fetch_weights(store, Layout.final_weights(cfg), work), dtype).eval()
    # with alignment, training's result (adapter/ or model/) is the SFT model the aligned one started from
    sft_dir = (
        fetch_weights(store, Layout.weights(cfg.method.type), work) if cfg.alignment is not None else None
    )
    if cfg.method.type == "full":
        base = load_base(base_dir, cfg.method, dtype, cfg.model.trust_remote_code).eval()
        sft = load_base(sft_dir, cfg.method, dtype, cfg.model.trust_remote_code).eval() if sft_dir else None
        if on_gpu:  # 4-bit models are placed on the GPU by transformers; full precision ones are not
            base, model = base.to("cuda"), model.to("cuda")
            sft = sft.to("cuda") if sft is not None else None
        return Models(model, tok, as_is(base), as_is(sft) if sft is not None else None)
    if on_gpu and cfg.method.type != "qlora":  # 4-bit models are already there (transformers places them)
        model = model.to("cuda")
    if sft_dir is not None:
        model.load_adapter(sft_dir, adapter_name="sft")

    @contextlib.contextmanager
    def as_base_adapter() -> Iterator[Any]:
        with model.disable_adapter():
            yield model

    return Models(model, tok, as_base_adapter, with_adapter(model, "sft") if sft_dir else None)


def held_out_pairs(cfg: TrainerConfig, store: Store, tok: Any) -> tuple[list[Any], list[list[float]]]:
    """The held-out preference pairs and the reference (SFT) log-probabilities the align stage stored for
    exactly these pairs ([chosen, rejected] each)."""
    assert cfg.alignment is not None
    ref = store.read_json(Layout.ALIGN_REFERENCE)
    if ref is None:
        raise PermanentError(f"no {Layout.ALIGN_REFERENCE}: did the align stage finish?")
    pairs = load_pairs(cfg, tok).eval
    if (ref.get("fingerprint") or {}).get("eval") != pairs_digest(pairs) or len(ref["eval"]) != len(pairs):
        raise PermanentError(
            f"the held-out preference pairs differ from those {Layout.ALIGN_REFERENCE} was computed for"
            " (spec.alignment.dataset changed after the align stage?)"
        )
    return pairs, ref["eval"]


def main(cfg: TrainerConfig) -> int:
    t0 = time.monotonic()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store = open_store(cfg.run.output_root, cfg.output)
    tracker = Tracker(cfg, store, Stage.EVAL)
    work = os.path.join(cfg.runtime.work_dir, "eval")
    shutil.rmtree(work, ignore_errors=True)
    models = load_models(cfg, store, work)
    model, tok = models.trained, models.tok
    data = prepare_eval(cfg, tok)
    examples = data.eval
    log_json("eval_data", curated_key=data.key, curated_reused=data.reused)
    if not examples:
        raise PermanentError("no held-out examples: set dataset.eval or dataset.evalSplit")
    ev = cfg.eval
    metrics: list[str] = list(ev.metrics)
    log_json(
        "eval_start", examples=len(examples), generate=min(ev.max_samples, len(examples)), metrics=metrics
    )
    pairs, ref_logps = held_out_pairs(cfg, store, tok) if cfg.alignment is not None else ([], [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    beta = cfg.alignment.beta if cfg.alignment is not None else 0.0
    with models.as_base() as base:
        base_res, base_preds = evaluate_model(base, tok, examples, metrics, ev.max_samples, ev.max_new_tokens)
        if pairs:  # only the base's own preference: its rewards against the SFT reference mean little
            own = preference_scores(base, pairs, ref_logps, beta, pad)["chosen_logp_accuracy"]
            base_res["chosen_logp_accuracy"] = own
    log_json("eval_base", **base_res)
    sft_res: dict[str, Any] | None = None
    sft_preds: list[str] = []
    if models.as_sft is not None:
        with models.as_sft() as sft:
            sft_res, sft_preds = evaluate_model(
                sft, tok, examples, metrics, ev.max_samples, ev.max_new_tokens
            )
        if pairs:  # the SFT model is the reference: rewards 0, its own preference from the stored logps
            sft_res.update(chosen_logp_accuracy=chosen_logp_accuracy(ref_logps), reward_margin=0.0)
        log_json("eval_sft", **sft_res)
    trained_res, preds = evaluate_model(model, tok, examples, metrics, ev.max_samples, ev.max_new_tokens)
    if pairs:
        trained_res.update(preference_scores(model, pairs, ref_logps, beta, pad))
    log_json("eval_trained", **trained_res)
    trained = metrics_of(trained_res)
    failed = ev.gates.failures(trained) if ev.gates else []
    status = EvalResults(**dict(trained), gates_passed=not failed, failed_gates=failed)
    results = {
        "base": base_res,
        **({"sft": sft_res} if sft_res is not None else {}),
        "trained": trained_res,
        "gates": ev.gates.model_dump(mode="json", exclude_none=True) if ev.gates else {},
        "gates_passed": not failed,
        "failed_gates": failed,
        "eval_examples": len(examples),
        "seconds": round(time.monotonic() - t0, 1),
        "status": status.model_dump(mode="json"),
    }
    samples = []
    for i, ex in enumerate(examples[: len(preds)]):
        p = to_prompted(ex)
        samples.append(
            {
                "index": i,
                "prompt": tok.decode(p.prompt_ids, skip_special_tokens=False),
                "reference": tok.decode(p.reference_ids, skip_special_tokens=True),
                "base": base_preds[i] if i < len(base_preds) else None,
                **({"sft": sft_preds[i] if i < len(sft_preds) else None} if models.as_sft else {}),
                "trained": preds[i],
            }
        )
    jsonl = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    store.put_bytes(jsonl.encode(), Layout.EVAL_SAMPLES)
    store.put_bytes(json.dumps(results, indent=1).encode(), Layout.EVAL_RESULTS)
    log_json("eval_done", gates_passed=not failed, failed_gates=failed, seconds=results["seconds"])
    shutil.rmtree(work, ignore_errors=True)
    tracker.log_eval()
    final = bool(failed) or cfg.is_final(Stage.EVAL)
    if final:  # nothing runs after this stage: it completes the run
        tracker.flush()  # the run's id is in the store before the manifest lists it
        close_run(store, cfg, Stage.EVAL, gate_failed=bool(failed))
        tracker.artifact(Layout.MANIFEST)
    run = tracker.close(final=final, failed=bool(failed))
    if failed:
        # becomes the pod's termination message (the operator's EvalGateFailed reason text), exit code 3
        raise EvalGateFailed("; ".join(failed))
    # the operator reads status.evalResults (and status.tracking) from the eval pod's termination message
    termination_message(cfg, run, evalResults=results["status"])
    return int(ExitCode.OK)
