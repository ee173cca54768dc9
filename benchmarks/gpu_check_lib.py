"""Pure helpers of the GPU check (benchmarks/gpu_check.py): time boxes, trainer configs, event parsing,
FLOPs/MFU, the pass/fail checks and the markdown report. No torch import, so they are unit-tested anywhere.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

# A fixed, low-entropy vocabulary: a randomly initialised model can learn its unigram statistics within a
# few LoRA steps, so "loss decreases" is a meaningful check even without pretrained weights.
_TEXT = (
    "the a of to and in is it that for on with as was at by an be this from or are have not but model data "
    "train token loss step batch learning rate memory speed pack sample answer question value result number "
    "list order item first second last name city river mountain color"
)
WORDS = _TEXT.split()


def make_rows(n: int, seed: int = 1234, max_prompt: int = 60, max_answer: int = 250) -> list[dict[str, str]]:
    """Deterministic prompt/completion pairs of varied length: 'repeat' or 'reverse' a list of words, padded
    by free text so answers range from a few to a few hundred words (the SFT length mix that packing is for)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        task = rng.choice(("repeat", "reverse"))
        answer = words if task == "repeat" else words[::-1]
        filler = [rng.choice(WORDS) for _ in range(rng.randint(0, max(0, max_prompt - 12)))]
        tail = [
            rng.choice(WORDS) for _ in range(int(rng.choice([2, 5, 20, 60, 120, max_answer]) * rng.random()))
        ]
        rows.append(
            {
                "prompt": f"{task}: {' '.join(words)}. context: {' '.join(filler)}",
                "completion": " ".join(answer + tail),
            }
        )
    return rows


def messages_jsonl(rows: list[dict[str, str]]) -> str:
    """The rows in the trainer's `messages` format (user prompt, assistant answer), one JSON per line."""
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
        )
        + "\n"
        for r in rows
    )


@dataclass
class Budget:
    """A wall-clock budget shared by all parts: each part gets min(its own box, what is left - reserve)."""

    total_s: float
    reserve_s: float = 10.0
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def box(self, want_s: float) -> float:
        return max(0.0, min(want_s, self.left() - self.reserve_s))


def trainer_config(
    *,
    model_dir: str,
    data: str,
    out_root: str,
    work_dir: str,
    method: str,
    steps: int,
    seq: int,
    global_batch: int,
    micro: int,
    lr: float,
    checkpoint_steps: int = 100_000,
    zero3: bool = False,
    name: str = "gpu-check",
    eval_enabled: bool = False,
    eval_samples: int = 16,
    eval_new_tokens: int = 32,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """A trainer config as the operator renders it (camelCase spec sections + run/runtime).

    `zero3`: ZeRO stage 3 with the optimizer offloaded to the host. On one rank that is the only
    configuration under which the trainer keeps stage 3 (speed.effective_zero_stage drops a lone rank
    without offload to stage 0, the shipped default that the throughput runs measure).
    """
    m: dict[str, Any] = {"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}
    if method == "qlora":
        m["quantization"] = {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    ds = {"zeroStage": 3, "offloadOptimizer": "cpu"} if zero3 else {"zeroStage": 3}
    return {
        "run": {"namespace": "bench", "name": name, "outputRoot": out_root},
        "model": {"uri": model_dir},
        "dataset": {
            "train": [data],
            "format": "messages",
            "maxSeqLength": seq,
            "packing": True,
            "evalSplit": 0.05,
        },
        "method": m,
        "training": {
            "maxSteps": steps,
            "learningRate": lr,
            "warmupRatio": 0.0,
            "scheduler": "constant",
            "globalBatchSize": global_batch,
            "microBatchSize": micro,
            "gradientCheckpointing": gradient_checkpointing,  # on: the shipped selective policy
            "checkpointSteps": checkpoint_steps,
            "seed": 7,
        },
        "resources": {"deepspeed": ds},
        "output": {"uri": out_root, "keepCheckpoints": 2},
        "eval": {"enabled": eval_enabled, "maxSamples": eval_samples, "maxNewTokens": eval_new_tokens},
        "merge": {"enabled": True, "dtype": "bfloat16"},
        "runtime": {"metricsPort": 0, "workDir": work_dir, "logEverySteps": 1},
    }


def json_events(text: str) -> list[dict[str, Any]]:
    """The trainer's JSON log lines (`{"ts": ..., "event": ...}`) in a process's stdout."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"event"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == name), None)


def step_losses(events: list[dict[str, Any]]) -> dict[int, float]:
    return {int(e["step"]): float(e["loss"]) for e in events if e.get("event") == "step"}


def throughput(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Real (non-padding) tokens per second over the step events after the first `warmup` steps."""
    steps = [e for e in events if e.get("event") == "step"][warmup:]
    tokens = sum(int(e["tokens"]) for e in steps)
    secs = sum(float(e["step_seconds"]) for e in steps)
    per_step = [int(e["tokens"]) / float(e["step_seconds"]) for e in steps if float(e["step_seconds"]) > 0]
    return {
        "timed_steps": len(steps),
        "tokens": tokens,
        "seconds": round(secs, 3),
        "tokens_per_second": round(tokens / secs, 1) if secs > 0 else None,
        "median_step_tokens_per_second": round(statistics.median(per_step), 1) if per_step else None,
    }


def loss_decreased(losses: dict[int, float], min_drop: float = 0.01) -> dict[str, Any]:
    """First step's loss vs the mean of the last three: decreased if it fell by at least `min_drop` (relative)."""
    if len(losses) < 4:
        return {"passed": False, "reason": f"only {len(losses)} steps logged"}
    ks = sorted(losses)
    first_loss = losses[ks[0]]
    last = sum(losses[k] for k in ks[-3:]) / 3
    return {
        "first": round(first_loss, 4),
        "last3_mean": round(last, 4),
        "relative_drop": round(1 - last / first_loss, 4),
        "passed": last < first_loss * (1 - min_drop),
    }


def resume_matches(original: dict[int, float], resumed: dict[int, float], tol: float) -> dict[str, Any]:
    """Losses of the steps both runs made; the resumed run must repeat the original's to within `tol`."""
    common = sorted(set(original) & set(resumed))
    if not common:
        return {"passed": False, "reason": "no common steps", "steps": []}
    diff = max(abs(original[k] - resumed[k]) for k in common)
    return {"steps": common, "max_abs_loss_diff": round(diff, 6), "tolerance": tol, "passed": diff <= tol}


def llama_matmul_params(cfg: dict[str, Any]) -> int:
    """Weights that take part in a matmul for every token: attention, MLP and the output layer (the input
    embedding is a lookup). From a LlamaConfig dict, so 4-bit checkpoints count the same as bf16 ones."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    return layers * per_layer + h * cfg["vocab_size"]


def lora_train_flops_per_token(n_matmul: int) -> int:
    """LoRA/QLoRA training without recomputation: forward 2N + the activations' gradient 2N (the frozen
    base needs no weight gradient); the adapters' own FLOPs (<1%) and attention scores are left out."""
    return 4 * n_matmul


def mfu(tokens_per_second: float | None, flops_per_token: int, peak_flops: float | None) -> float | None:
    if not tokens_per_second or not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops


def _fmt(x: Any, spec: str = "") -> str:
    if x is None:
        return "-"
    return format(x, spec) if spec else str(x)


def _mark(ok: Any) -> str:
    return "pass" if ok is True else ("FAIL" if ok is False else "-")


def throughput_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per throughput run; ours against TRL's default and fastest runs of the same method; then the
    first steps' losses of every run (same data and lr: the curves should start alike)."""
    rows = [
        "| run | method | status | samples/step | real tok/s | median step tok/s | MFU | peak GPU mem (GiB) "
        "| peak RSS (GiB) | ours / TRL default | ours / TRL fastest |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def tps_of(impl: str) -> dict[str, float]:
        return {
            r["method"]: r["tokens_per_second"]
            for r in runs
            if r["impl"] == impl and r.get("tokens_per_second")
        }

    trl, fastest = tps_of("trl"), tps_of("trl_fastest")
    for r in runs:
        tps = r.get("tokens_per_second")
        ours = r["impl"].startswith("ours") and tps
        ratios = [
            f"{tps / ref[r['method']]:.2f}x" if ours and ref.get(r["method"]) else None
            for ref in (trl, fastest)
        ]
        mem, rss = r.get("peak_gpu_mem_bytes"), r.get("peak_rss_bytes")
        mfu_v = r.get("mfu")
        rows.append(
            f"| {r['name']} | {r['method']} | {r['status']} | {_fmt(r.get('samples_per_step'))} | "
            f"{_fmt(tps, ',.0f')} | {_fmt(r.get('median_step_tokens_per_second'), ',.0f')} | "
            f"{_fmt(None if mfu_v is None else 100 * mfu_v, '.1f')}{'%' if mfu_v is not None else ''} | "
            f"{_fmt(None if mem is None else mem / 2**30, '.1f')} | {_fmt(None if rss is None else rss / 2**30, '.2f')} | "
            f"{_fmt(ratios[0])} | {_fmt(ratios[1])} |"
        )
    rows += ["", "| run | attention | first losses |", "| --- | --- | --- |"]
    for r in runs:
        losses = ", ".join(f"{x:.4f}" for x in (r.get("losses") or [])[:5])
        rows.append(f"| {r['name']} | {_fmt(r.get('attention'))} | {losses or '-'} |")
    return rows


def markdown(res: dict[str, Any]) -> str:
    """The human-readable report: environment, the three parts, failures with their error tails."""
    env = res.get("env", {})
    out = [
        f"# GPU check ({res.get('mode', '?')})",
        "",
        f"- date: {res.get('date')}; command: `{res.get('command')}`",
        f"- machine: {env.get('gpu', '?')}; {env.get('cpus', '?')} CPUs",
        f"- software: {env.get('versions', {})}",
        f"- trainer source: {env.get('source', '?')}",
        f"- model: {res.get('model', {}).get('description', '?')}",
        f"- measured matmul peak ({res.get('peak_kind', '?')}): {_fmt(res.get('peak_tflops'), '.4g')} TFLOP/s "
        "(MFU = real tok/s x 4N / this peak; N = matmul weights incl. the output layer)",
        f"- total: {res.get('seconds')} s",
        "",
    ]
    a = res.get("parts", {}).get("a_qlora_zero3", {})
    backend = "NCCL" if res.get("mode") == "gpu" else "gloo, fp32 compute on CPU"
    out += [
        f"## (a) QLoRA nf4 (bf16 compute, bf16 quant storage), ZeRO-3 ({backend}), 1 rank",
        "",
        f"- status: {a.get('status', 'not run')}; ZeRO stage {_fmt(a.get('zero_stage'))}, "
        f"4-bit layers {_fmt(a.get('linear_4bit_layers'))}, trainable params {_fmt(a.get('trainable_params'), ',')}",
        f"- loss decreases: {_mark(a.get('loss', {}).get('passed'))} {a.get('loss', {})}",
        f"- checkpoint at step {_fmt(a.get('checkpoint_step'))} saved in {_fmt(a.get('checkpoint_seconds'))} s; "
        f"resumed from step {_fmt(a.get('resumed_from'))}: {_mark(a.get('resume', {}).get('passed'))} {a.get('resume', {})}",
        f"- tok/s in this run: {_fmt(a.get('tokens_per_second'), ',.0f')}",
        "",
    ]
    b = res.get("parts", {}).get("b_throughput", {})
    out += [
        "## (b) Throughput, ours vs TRL SFTTrainer (same model, data, LoRA r16 all-linear, no recompute)",
        "",
        *throughput_table(b.get("runs", [])),
        "",
        *[f"- {n}" for n in b.get("notes", [])],
        "",
    ]
    c = res.get("parts", {}).get("c_eval_merge", {})
    out += [
        "## (c) eval and merge stages",
        "",
        f"- eval: {c.get('eval', {}).get('status', 'not run')} in {_fmt(c.get('eval', {}).get('seconds'))} s; "
        f"base {c.get('eval', {}).get('base')}; trained {c.get('eval', {}).get('trained')}",
        f"- merge: {c.get('merge', {}).get('status', 'not run')} in {_fmt(c.get('merge', {}).get('seconds'))} s; "
        f"verification {c.get('merge', {}).get('verification')}",
        "",
    ]
    fails = [(k, v) for k, v in res.get("failures", {}).items() if v]
    if fails:
        out += ["## Failures", ""]
        for k, v in fails:
            out += [f"### {k}", "", "```", str(v)[-3000:], "```", ""]
    return "\n".join(out)
