"""The ready GPU check (issue 17 part 4): one GPU, at most ~8 minutes, three parts, one result file.

    python benchmarks/gpu_check.py --out DIR [--budget-s 520] [--parts a,c,b] [--tokenizer DIR]
    python benchmarks/gpu_check.py --cpu-smoke --out DIR      # the same code paths, tiny model, CPU/gloo

(a) QLoRA nf4 (bf16 compute, bf16 quant storage) on a randomly initialised 1B-shaped Llama, through the real
    entry point (`python -m sftjob_trainer launch --nproc-per-node=1 ... train`), ZeRO-3 on NCCL with the
    optimizer on the host (on one rank the trainer keeps stage 3 only with offload): the loss must fall, a
    checkpoint must be written, and a second run on the same output must resume from it and repeat the
    first run's losses for the steps after it.
(b) real tokens/s and MFU of our trainer (shipped defaults for one rank: ZeRO stage 0) vs TRL SFTTrainer on
    the same model and data, bf16 LoRA and QLoRA, interleaved: TRL's defaults and its fastest configuration
    (packing bfd + padding_free + Liger when installed + ours' attention), and on a GPU ours with SDPA
    instead of FlexAttention (LoRA; same first losses expected); first losses of every run.
(c) the eval and merge stages (`python -m sftjob_trainer eval|merge`) on (a)'s adapter.

Every step runs in its own process with its own time box inside a total budget; a failed or timed-out step
is recorded (with its error tail) and the others still run. gpu_check.json and gpu_check.md are rewritten
after every step, so whatever finished is on disk even if the whole command is killed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_check_lib as lib  # noqa: E402

REPO = os.path.dirname(HERE)
# per-step time boxes (s): GPU, CPU smoke
BOXES = {
    "setup": (150, 300),
    "a1": (150, 400),
    "a2": (110, 300),
    "eval": (100, 300),
    "merge": (120, 300),
    "bench": (100, 300),
}
MIN_BOX_S = 25.0
# part (b)'s runs per method: ours as shipped, ours with SDPA (GPU), TRL's defaults, TRL's fastest settings
IMPLS = ("ours", "ours_sdpa", "trl", "trl_fastest")


class GpuMemSampler:
    """Peak `nvidia-smi` memory.used (whole GPU, allocator cache included) while a step runs."""

    def __init__(self) -> None:
        self.enabled = shutil.which("nvidia-smi") is not None
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mib = max([self.peak_mib, *(int(x) for x in out.split() if x.isdigit())])
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def peak_bytes(self) -> int | None:
        return self.peak_mib * 2**20 if self.enabled and self.peak_mib else None


def run_step(name: str, cmd: list[str], env: dict[str, str], timeout: float, log: Any) -> dict[str, Any]:
    """Run one step's process (its own session, killed as a group at the time box), echoing its output."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (box {timeout:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=REPO,
    )
    buf: dict[str, list[str]] = {"out": [], "err": []}

    def pump(stream: Any, key: str) -> None:
        for line in stream:
            buf[key].append(line)
            log.write(f"[{name}{'' if key == 'out' else '!'}] {line}")
            log.flush()

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True),
    ]
    for t in threads:
        t.start()
    timed_out = False
    with GpuMemSampler() as mem:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
    for t in threads:
        t.join(timeout=10)
    secs = round(time.monotonic() - t0, 1)
    log.write(f"===== {name}: rc={proc.returncode} timed_out={timed_out} {secs} s\n")
    log.flush()
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "seconds": secs,
        "stdout": "".join(buf["out"]),
        "stderr": "".join(buf["err"]),
        "peak_gpu_mem_bytes": mem.peak_bytes,
    }


def status_of(r: dict[str, Any]) -> str:
    return "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else f"failed (exit {r['rc']})")


def error_tail(r: dict[str, Any]) -> str:
    noise = ("Warning", "warn(", "FutureWarning", "UserWarning")
    err = [x for x in r["stderr"].splitlines() if not any(n in x for n in noise)]
    return "\n".join(err[-40:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Check:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.smoke = a.cpu_smoke
        self.out = os.path.abspath(a.out)
        self.work = os.path.abspath(a.work)
        self.budget = lib.Budget(a.budget_s)
        self.log = open(os.path.join(self.out, "gpu_check.log"), "a", buffering=1)  # noqa: SIM115
        src = os.path.abspath(a.src)
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            "SFTJOB_MODEL_CACHE": os.path.join(self.work, "model-cache"),
            "PYTHONPATH": os.pathsep.join(
                p
                for p in (
                    os.path.join(src, "operator"),
                    os.path.join(src, "trainer_image"),
                    HERE,
                    os.environ.get("PYTHONPATH", ""),
                )
                if p
            ),
        }
        self.env.pop("SFTJOB_CONFIG", None)
        if self.smoke:
            self.env["DS_ACCELERATOR"] = "cpu"
        self.res: dict[str, Any] = {
            "mode": "cpu-smoke" if self.smoke else "gpu",
            "command": " ".join([sys.executable, *sys.argv]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "env": {"source": a.source_note or src},
            "parts": {},
            "failures": {},
        }
        self.assets: dict[str, Any] = {}
        self.have_trl = importlib.util.find_spec("trl") is not None

    # --- plumbing -------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.res["seconds"] = round(self.budget.total_s - self.budget.left(), 1)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(lib.markdown(self.res) + "\n")

    def ours_env(self, attention: str | None = None) -> dict[str, str]:
        """Our trainer's environment: FlexAttention on the GPU (opt-in until this check has run it there,
        model.training_attention), SDPA on the CPU smoke (no CPU backward)."""
        chosen = attention or ("sdpa" if self.smoke else "flex_attention")
        return {**self.env, "SFTJOB_ATTENTION": chosen}

    def step(
        self, name: str, box: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """Run a step inside its time box; None (recorded as skipped) when the budget is spent."""
        want = BOXES[box][1 if self.smoke else 0]
        timeout = self.budget.box(want)
        if timeout < MIN_BOX_S:
            self.res["failures"][name] = f"skipped: {self.budget.left():.0f} s of the budget left"
            return None
        print(f"--- {name} (box {timeout:.0f} s, budget left {self.budget.left():.0f} s)", flush=True)
        r = run_step(name, cmd, env or self.env, timeout, self.log)
        if r["rc"] != 0 or r["timed_out"]:
            self.res["failures"][name] = f"{status_of(r)} after {r['seconds']} s\n{error_tail(r)}"
        print(f"--- {name}: {status_of(r)} in {r['seconds']} s", flush=True)
        return r

    def trainer(self, stage: str, config: str) -> list[str]:
        if stage == "train":  # the operator's launcher: torchrun, exit codes restored from the workers
            return [
                sys.executable,
                "-m",
                "sftjob_trainer",
                "launch",
                "--nnodes=1",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={free_port()}",
                "train",
                "--config",
                config,
            ]
        return [sys.executable, "-m", "sftjob_trainer", stage, "--config", config]

    def write_config(self, name: str, cfg: dict[str, Any]) -> str:
        path = os.path.join(self.work, f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)
        return path

    def geometry(self) -> dict[str, int]:
        """Our batch shape: packed rows of `seq` tokens, `global_batch` rows per step, `micro` per forward."""
        return (
            {"seq": 256, "global_batch": 4, "micro": 2}
            if self.smoke
            else {"seq": 2048, "global_batch": 8, "micro": 4}
        )

    def config(self, name: str, method: str, **kw: Any) -> dict[str, Any]:
        geo = self.geometry()
        return lib.trainer_config(
            model_dir=self.assets["model_dir"],
            data=self.assets["data"],
            out_root=os.path.join(self.work, name, "out"),
            work_dir=os.path.join(self.work, name, "work"),
            method=method,
            name=name,
            **{**geo, **kw},
        )

    # --- the parts ------------------------------------------------------------------------------------------
    def setup(self) -> bool:
        d = os.path.join(self.work, "assets")
        cmd = [sys.executable, os.path.join(HERE, "gpu_check_setup.py"), "assets", d]
        cmd += ["--smoke"] if self.smoke else ["--tokenizer", self.a.tokenizer]
        os.makedirs(d, exist_ok=True)
        r = self.step("setup", "setup", cmd)
        line = next((x for x in (r or {}).get("stdout", "").splitlines() if x.startswith("ASSETS ")), None)
        if line is None:
            return False
        self.assets = json.loads(line[len("ASSETS ") :])
        env = self.res["env"]
        env.update(gpu=self.assets["gpu"], cpus=self.assets["cpus"], versions=self.assets["versions"])
        self.res["model"] = {k: self.assets[k] for k in ("description", "params", "matmul_params", "config")}
        self.res["peak_tflops"] = float(f"{self.assets['peak_flops'] / 1e12:.4g}")
        self.res["peak_kind"] = self.assets["peak_kind"]
        self.res["setup_seconds"] = self.assets["seconds"]
        return True

    def part_a(self) -> None:
        steps, ckpt = (6, 3) if self.smoke else (10, 5)
        cfg = self.config(
            "a",
            "qlora",
            steps=steps,
            checkpoint_steps=ckpt,
            lr=2e-3,
            zero3=True,
            eval_enabled=True,
            eval_samples=8 if self.smoke else 16,
            # the shipped default (selective recomputation) around FlexAttention's compiled kernel: issue 27
            gradient_checkpointing=True,
        )
        path = self.write_config("a", cfg)
        part: dict[str, Any] = {"status": "running", "config": cfg}
        self.res["parts"]["a_qlora_zero3"] = part
        r1 = self.step("a1_train", "a1", self.trainer("train", path), self.ours_env())
        if r1 is None:
            part["status"] = "skipped"
            return
        ev = lib.json_events(r1["stdout"])
        ds, model, ck = lib.first(ev, "deepspeed"), lib.first(ev, "model"), lib.first(ev, "checkpoint")
        losses = lib.step_losses(ev)
        part.update(
            status=status_of(r1),
            seconds=r1["seconds"],
            peak_gpu_mem_bytes=r1["peak_gpu_mem_bytes"],
            zero_stage=ds and ds.get("zero_stage"),
            losses=losses,
            loss=lib.loss_decreased(losses),
            linear_4bit_layers=model and model.get("linear_4bit_layers"),
            trainable_params=model and model.get("trainable_params"),
            checkpoint_step=ck and ck.get("step"),
            checkpoint_seconds=ck and ck.get("seconds"),
            tokens_per_second=lib.throughput(ev, 1)["tokens_per_second"],
            adapter_written=lib.first(ev, "done") is not None,
        )
        self.save()
        if ck is None:
            part["resume"] = {"passed": False, "reason": "no checkpoint event in the first run"}
            return
        r2 = self.step("a2_resume", "a2", self.trainer("train", path), self.ours_env())
        if r2 is None:
            return
        ev2 = lib.json_events(r2["stdout"])
        resumed = lib.first(ev2, "resumed")
        part["resumed_from"] = resumed and resumed.get("step")
        part["resume"] = lib.resume_matches(losses, lib.step_losses(ev2), tol=1e-3 if self.smoke else 2e-2)
        part["resume"]["run_status"] = status_of(r2)
        if not resumed:
            part["resume"]["passed"] = False
        ok = (
            status_of(r1) == status_of(r2) == "ok"
            and part["zero_stage"] == 3
            and part["loss"]["passed"]
            and part["resume"]["passed"]
        )
        part["status"] = "ok" if ok else "checks failed"

    def part_c(self) -> None:
        a = self.res["parts"].get("a_qlora_zero3", {})
        part: dict[str, Any] = {}
        self.res["parts"]["c_eval_merge"] = part
        if not a.get("adapter_written"):
            part["eval"] = part["merge"] = {"status": "skipped: (a) wrote no adapter"}
            return
        path = os.path.join(self.work, "a.json")
        r = self.step("c_eval", "eval", self.trainer("eval", path))
        if r is not None:
            ev = lib.json_events(r["stdout"])
            base, trained = lib.first(ev, "eval_base") or {}, lib.first(ev, "eval_trained") or {}
            strip = ("ts", "event")
            part["eval"] = {
                "status": status_of(r),
                "seconds": r["seconds"],
                "peak_gpu_mem_bytes": r["peak_gpu_mem_bytes"],
                "base": {k: v for k, v in base.items() if k not in strip},
                "trained": {k: v for k, v in trained.items() if k not in strip},
            }
            self.save()
        r = self.step("c_merge", "merge", self.trainer("merge", path))
        if r is not None:
            ver = lib.first(lib.json_events(r["stdout"]), "merge_verified") or {}
            part["merge"] = {
                "status": status_of(r),
                "seconds": r["seconds"],
                "verification": {k: v for k, v in ver.items() if k not in ("ts", "event")},
                "files": sorted(os.listdir(os.path.join(self.work, "a", "out", "merged")))
                if os.path.isdir(os.path.join(self.work, "a", "out", "merged"))
                else [],
            }

    def part_b(self) -> None:
        warm, timed = (1, 2) if self.smoke else (2, 8)
        part: dict[str, Any] = {"runs": [], "notes": []}
        self.res["parts"]["b_throughput"] = part
        fpt = lib.lora_train_flops_per_token(self.assets["matmul_params"])
        batch, accum = (4, 2) if self.smoke else (self.a.trl_batch, self.a.trl_accum)
        geo = self.geometry()
        trl_geo = ["--batch", str(batch), "--accum", str(accum), "--max-len", str(geo["seq"])]
        # packed TRL gets ours' geometry: the same rows of `seq` tokens per micro-batch and per step
        packed_geo = ["--batch", str(geo["micro"]), "--accum", str(geo["global_batch"] // geo["micro"])]
        packed_geo += ["--max-len", str(geo["seq"])]
        # smoke: LoRA only, so that the whole path (ours, TRL default, TRL fastest) runs in ~2 minutes on CPU
        for method in ("lora",) if self.smoke else ("lora", "qlora"):
            for impl in IMPLS:
                if impl == "ours_sdpa" and (self.smoke or method != "lora"):
                    continue  # ours' CPU attention is SDPA already; on GPU one method shows the difference
                name = f"{impl}_{method}"
                run: dict[str, Any] = {"name": name, "impl": impl, "method": method}
                part["runs"].append(run)
                if impl.startswith("trl") and not self.have_trl:
                    run["status"] = "skipped: trl is not installed (pip install trl)"
                    self.save()
                    continue
                if impl.startswith("ours"):
                    path = self.write_config(
                        f"b_{name}", self.config(f"b_{name}", method, steps=warm + timed, lr=2e-4)
                    )
                    env = self.ours_env("sdpa" if impl == "ours_sdpa" else None)
                    r = self.step(f"b_{name}", "bench", self.trainer("train", path), env)
                    if r is not None:
                        ev = lib.json_events(r["stdout"])
                        run.update(lib.throughput(ev, warm))
                        data, ds = lib.first(ev, "data") or {}, lib.first(ev, "deepspeed") or {}
                        run["zero_stage"] = ds.get("zero_stage")
                        run["attention"] = (lib.first(ev, "model") or {}).get("attention")
                        if data.get("rows"):
                            run["samples_per_step"] = round(
                                data["train_examples"]
                                / data["rows"]
                                * data["plan"]["micro"]
                                * data["plan"]["accum"],
                                1,
                            )
                        run["losses"] = list(lib.step_losses(ev).values())
                else:
                    cmd = [
                        sys.executable,
                        os.path.join(HERE, "gpu_check_trl.py"),
                        "--model",
                        self.assets["model_dir"],
                        "--rows",
                        self.assets["rows"],
                        "--method",
                        method,
                        "--steps",
                        str(timed),
                        "--warmup",
                        str(warm),
                        "--lr",
                        "2e-4",
                        "--config",
                        "fastest" if impl == "trl_fastest" else "default",
                        *(packed_geo if impl == "trl_fastest" else trl_geo),
                    ]
                    r = self.step(f"b_{name}", "bench", cmd)
                    line = next(
                        (x for x in (r or {}).get("stdout", "").splitlines() if x.startswith("RESULT ")), None
                    )
                    if line:
                        run.update(json.loads(line[len("RESULT ") :]))
                run["status"] = "skipped" if r is None else status_of(r)
                if r is not None:
                    run["peak_gpu_mem_bytes"] = r["peak_gpu_mem_bytes"]
                    run["seconds_total"] = r["seconds"]
                run["mfu"] = lib.mfu(run.get("tokens_per_second"), fpt, self.assets["peak_flops"])
                self.save()
        part["notes"] = [
            f"ours: packed rows of <= {geo['seq']} tokens, {geo['global_batch']} rows per step (micro "
            f"{geo['micro']}), shipped one-rank default (ZeRO stage 0), first {warm} steps untimed, {timed} timed",
            f"TRL: SFTTrainer defaults (no packing, padded batches), {' '.join(trl_geo)}, bf16 autocast, "
            f"first {warm} steps untimed, {timed} timed",
            f"TRL fastest: packing=True (bfd), padding_free=True, Liger kernels when installed (GPU), ours' attention "
            f"implementation (gpu_check_trl.py --config fastest), ours' rows: {' '.join(packed_geo)}",
            "ours_sdpa: ours with SFTJOB_ATTENTION=sdpa (the CPU path's attention) against ours' FlexAttention: "
            "same first losses expected (bf16 rounding apart), the difference in tok/s is varlen attention's",
            "peak GPU memory: nvidia-smi memory.used of the whole GPU (CUDA context and allocator cache included)",
            f"MFU: {fpt / 1e9:.2f} GFLOP per token (4 x {self.assets['matmul_params'] / 1e9:.3f} B matmul weights) "
            f"over the measured peak ({self.res.get('peak_kind')})",
        ]

    def run(self, parts: list[str]) -> int:
        self.save()
        if not self.setup():
            self.save()
            return 1
        self.save()
        for p in parts:
            try:
                {"a": self.part_a, "b": self.part_b, "c": self.part_c}[p]()
            except Exception as e:  # a bug in this script must not lose the other parts' results
                self.res["failures"][f"part_{p}"] = f"{type(e).__name__}: {e}"
            self.save()
        print(lib.markdown(self.res), flush=True)
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="result directory (default $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU (gloo), same code paths")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="total wall-clock budget (520 GPU, 1500 smoke)"
    )
    ap.add_argument("--parts", default="a,c,b")
    # 64 x 2 = 128 samples per step, close to the ~140 that ours packs into 8 rows of 2048 tokens
    ap.add_argument("--trl-batch", type=int, default=64, help="TRL per-device batch (samples) on GPU")
    ap.add_argument("--trl-accum", type=int, default=2, help="TRL gradient accumulation on GPU")
    ap.add_argument("--tokenizer", default=os.path.join(REPO, ".gpu_assets", "tokenizer"))
    ap.add_argument("--src", default=REPO, help="checkout whose operator/ and trainer_image/ are run")
    ap.add_argument("--source-note", default=None, help="what --src is (e.g. the commit it was taken at)")
    ap.add_argument("--work", default="/tmp/gpu_check_work", help="scratch (model, checkpoints); wiped first")
    a = ap.parse_args()
    if not a.out:
        ap.error("--out or $OUT is required")
    if a.budget_s is None:
        a.budget_s = 1500.0 if a.cpu_smoke else 520.0  # (b) has 7 runs since issue 27 (was 4: 390 s)
    os.makedirs(a.out, exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    sys.exit(Check(a).run(a.parts.split(",")))


if __name__ == "__main__":
    main()
