"""Checkpoints under `<output_root>/checkpoints/<run>/step-N/` with a COMPLETE marker written last (the align
stage's under `align/checkpoints/<run>/step-N/`, the same way: `Identity.prefix`).

Two formats, named in the marker:
  adapter    lora/qlora: the trainable weights, their Adam moments in fp32 (portable.py; adamw_8bit's
             dequantized: bnb_state.py) in one safetensors file, plus each rank's RNG state as JSON (and,
             adamw_8bit, its raw 8-bit state, read back only at the same world size). Any world size resumes it.
  deepspeed  full fine-tuning: DeepSpeed's per-rank files (torch pickles, read by DeepSpeed itself) plus RNG
             JSON. The same world size fetches and loads its own partitions; another size fetches every
             rank's files and converts them to DeepSpeed's universal checkpoint (universal.py) once per node.

Protocol (every rank takes part):
  1. each rank writes its files into a local staging dir and hashes them (sha256);
  2. each rank uploads what it wrote to checkpoints/<run>/step-N/ (rank files never collide);
  3. barrier; rank 0 writes COMPLETE (JSON: run, spec fingerprint, world size, the train state, and every
     file's sha256); barrier;
  4. rank 0 deletes this run's oldest complete checkpoints beyond `keep`, and its incomplete ones older than N.
Resume only ever considers this run's steps whose COMPLETE exists (a crash mid-upload is ignored), checks the
marker's run and fingerprint (run_identity.py), fetches only the files this rank reads, and verifies each
against the marker's sha256 before anything parses it (docs/security.md says what that does and does not
defend against).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from sftjob_api.exit_codes import PermanentError
from sftjob_api.layout import Layout
from sftjob_api.storage import Store

from . import bnb_state, portable, universal
from .metrics import log_json
from .run_identity import check_marker, digest

ADAPTER, DEEPSPEED = "adapter", "deepspeed"


@dataclass
class TrainState:
    """What the loop needs to continue: the marker's `state`. `samples` is the cursor in the global sample
    order (packed rows consumed since step 0): independent of the world size, so a resize continues with
    exactly the rows not yet seen."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    loss: float = float("nan")

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> TrainState:
        return TrainState(int(d["step"]), int(d["samples"]), int(d["tokens"]), float(d["loss"]))


def to_delete(
    keys: Iterable[str], run_id: str, keep: int, just_written: int, prefix: str = Layout.CHECKPOINTS
) -> list[int]:
    """This run's old complete checkpoints beyond `keep` (never the one just written), and stale incomplete
    ones. Other runs' checkpoints are never touched."""
    done, partial = Layout.scan_checkpoints(keys, run_id, prefix)
    old = [s for s in done if s != just_written][: max(0, len(done) - max(keep, 1))]
    return old + [s for s in partial if s < just_written]


# files owned by one data-parallel rank: DeepSpeed's ZeRO partitions (model and optimizer states,
# `bf16_` prefixed in bf16 mode) and our RNG state; `mp_rank_00` is the model-parallel rank, shared here
_RANK_OWNED = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rng_rank(\d+)\.json$")


def needed_by(name: str, rank: int) -> bool:
    """Whether `rank` reads this file of a deepspeed-format checkpoint on resume: those it owns and those no
    rank owns (e.g. mp_rank_00_model_states.pt below ZeRO-3), never the marker (already read) nor another
    rank's partition (DeepSpeed reads only its own)."""
    m = _RANK_OWNED.match(name)
    owner = None if m is None else int(m.group(1) or m.group(2))
    return name != Layout.CHECKPOINT_MARKER and owner in (None, rank)


def files_for_rank(names: Iterable[str], rank: int) -> list[str]:
    """The files of one deepspeed-format checkpoint listing that `rank` needs on resume (`needed_by`)."""
    return sorted(n for n in names if needed_by(n, rank))


def adapter_files(rank: int, saved_world: int, world: int, names: Iterable[str]) -> list[str]:
    """What `rank` reads of an adapter-format checkpoint: the state, the RNG of the rank it replaces, and at
    the same world size its own raw 8-bit optimizer state if there is one (bnb_state.py)."""
    raw = bnb_state.rank_file(rank)
    same = [raw] if saved_world == world and raw in names else []
    return sorted([portable.STATE_FILE, f"rng_rank{rank % saved_world}.json", *same])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_dir(local: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(local):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, local).replace(os.sep, "/")] = sha256_file(path)
    return out


def verify(local: str, names: Iterable[str], hashes: Mapping[str, str], where: str) -> None:
    """Each fetched file must be listed in the marker with this content: before anything parses it."""
    for name in names:
        want = hashes.get(name)
        if want is None:
            raise PermanentError(f"{where}/{name} is not listed in its COMPLETE marker: refusing to load it")
        if sha256_file(os.path.join(local, name)) != want:
            raise PermanentError(
                f"{where}/{name} does not match the sha256 in its COMPLETE marker (changed after it was"
                " written): refusing to load the checkpoint"
            )


def read_marker(store: Store, key: str) -> dict[str, Any]:
    try:
        return dict(json.loads(store.get_bytes(key)))
    except (ValueError, TypeError) as e:
        raise PermanentError(f"{key} is not a checkpoint marker (JSON): {e}") from e


# Test-only (docs/trainer.md): rank 0 waits (at most 10 min) before step N's COMPLETE marker, every rank's
# files uploaded, so a test SIGKILLs it inside a checkpoint upload however fast the upload is.
HOLD_MARKER_ENV = "SFTJOB_TEST_HOLD_BEFORE_MARKER"


def hold_before_marker(step: int, limit_s: float = 600) -> None:
    if os.environ.get(HOLD_MARKER_ENV) == str(step):
        time.sleep(limit_s)


@dataclass(frozen=True)
class Identity:
    """Who writes and may read a run's checkpoints."""

    run_id: str
    fingerprint: dict[str, Any]
    fmt: str  # ADAPTER or DEEPSPEED
    prefix: str = Layout.CHECKPOINTS  # the stage's checkpoint prefix (Layout.ALIGN_CHECKPOINTS: align)

    def where(self, step: int) -> str:
        return Layout.checkpoint(self.run_id, step, self.prefix)

    def marker_key(self, step: int) -> str:
        return Layout.checkpoint_marker(self.run_id, step, self.prefix)

    def marker(self, state: TrainState, world: int, files: Mapping[str, str]) -> dict[str, Any]:
        return {
            "step": state.step,
            "run": self.run_id,
            "format": self.fmt,
            "world_size": world,
            "fingerprint_sha256": digest(self.fingerprint),
            "fingerprint": self.fingerprint,
            "state": asdict(state),
            "files": dict(sorted(files.items())),
        }


def save(
    engine: Any, store: Store, ident: Identity, state: TrainState, rank: int, staging: str, keep: int
) -> None:
    step, world = state.step, dist.get_world_size()
    tag = f"step-{step}"
    local = os.path.join(staging, f"rank{rank}", tag)
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    os.makedirs(local, exist_ok=True)
    if ident.fmt == ADAPTER:
        from safetensors.torch import save_file

        tensors = portable.gather(engine)  # collective
        if rank == 0:
            save_file(tensors, os.path.join(local, portable.STATE_FILE))
        opt = portable.base(engine)
        if bnb_state.is_bnb(opt):
            save_file(bnb_state.raw_state(engine, opt), os.path.join(local, bnb_state.rank_file(rank)))
    else:
        engine.save_checkpoint(
            os.path.dirname(local),
            tag=tag,
            client_state=universal.client_state(engine),
            exclude_frozen_parameters=not full(engine),
        )
    with open(os.path.join(local, f"rng_rank{rank}.json"), "wb") as f:
        f.write(portable.rng_bytes())
    mine = hash_dir(local)
    store.upload_dir(local, ident.where(step))
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    every: list[dict[str, str]] = [{} for _ in range(world)]
    dist.all_gather_object(every, mine)
    if rank == 0:
        hold_before_marker(step)
        files = {k: v for per_rank in every for k, v in per_rank.items()}
        marker = ident.marker(state, world, files)
        store.put_bytes(json.dumps(marker, indent=1).encode(), ident.marker_key(step))
        for old in to_delete(store.list(ident.prefix), ident.run_id, keep, step, ident.prefix):
            store.delete_prefix(ident.where(old))
    dist.barrier()


def full(engine: Any) -> bool:
    """Whether every parameter trains (method full): DeepSpeed then saves the frozen ones too (none)."""
    return all(p.requires_grad for p in engine.module.parameters())


def fetch(
    store: Store, prefix: str, names: list[str], local: str, hashes: Mapping[str, str], where: str
) -> list[str]:
    """Download `names` of the checkpoint at `prefix` into `local` and verify them against the marker."""
    shutil.rmtree(local, ignore_errors=True)
    wanted = set(names)
    got = set(store.download_dir(prefix, local, keep=lambda n: n in wanted))
    if got != wanted:
        raise PermanentError(f"{where} lacks {sorted(wanted - got)}, which its marker lists")
    verify(local, sorted(got), hashes, where)
    return sorted(got)


def load(
    engine: Any, store: Store, ident: Identity, step: int, rank: int, staging: str
) -> tuple[TrainState, list[str]]:
    """Restore this run's checkpoint of `step` after checking run, fingerprint and every file's hash; return
    the train state and the files this rank fetched."""
    where = ident.where(step)
    marker = read_marker(store, ident.marker_key(step))
    check_marker(marker, ident.run_id, ident.fingerprint, where)
    fmt, saved_world, hashes = marker.get("format"), int(marker["world_size"]), dict(marker["files"])
    world = dist.get_world_size()
    local = os.path.join(staging, f"resume-rank{rank}", f"step-{step}")
    state = TrainState.from_json(marker["state"])
    if fmt == ADAPTER:
        names = adapter_files(rank, saved_world, world, hashes)
    elif fmt == DEEPSPEED and saved_world != world:
        return state, load_resized(engine, store, where, hashes, step, saved_world, rank, staging)
    elif fmt == DEEPSPEED:
        names = files_for_rank(hashes, rank)
    else:
        raise PermanentError(f"{where}: unknown checkpoint format {fmt!r} in its marker")
    fetched = fetch(store, where, names, local, hashes, where)
    if fmt == ADAPTER:
        from safetensors.torch import load_file

        raw = bnb_state.rank_file(rank)
        raw_8bit = load_file(os.path.join(local, raw)) if raw in names else None
        portable.scatter(engine, load_file(os.path.join(local, portable.STATE_FILE)), state.step, raw_8bit)
    else:
        path, _ = engine.load_checkpoint(
            os.path.dirname(local),
            tag=f"step-{step}",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=full(engine),
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {where}")
    restore_rng(local, fetched)
    shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    return state, fetched


def restore_rng(local: str, fetched: list[str]) -> None:
    rng = [n for n in fetched if n.startswith("rng_rank")]
    if rng:
        with open(os.path.join(local, rng[0])) as f:
            portable.set_rng_state(json.load(f))


def load_resized(
    engine: Any,
    store: Store,
    where: str,
    hashes: Mapping[str, str],
    step: int,
    saved_world: int,
    rank: int,
    staging: str,
) -> list[str]:
    """A deepspeed-format checkpoint written by `saved_world` ranks, loaded at this run's world size: the
    first rank of each node (pods share no filesystem) fetches every rank's files (hashes verified) and
    converts them to DeepSpeed's universal checkpoint; every rank then loads it and takes the RNG state of
    old rank `rank % saved_world`. Returns the files this node fetched."""
    partitions = any("optim_states" in n for n in hashes)
    one_rank = saved_world == 1 and universal.UNPARTITIONED in hashes and not partitions
    if not universal.loadable(engine) or not (partitions or (one_rank and universal.zero3(engine))):
        raise PermanentError(
            f"{where} was written by {saved_world} ranks, this run has {dist.get_world_size()}: a deepspeed-"
            "format checkpoint resumes at another size only with optimizer adamw, and from one rank without"
            " ZeRO only into zeroStage 3 (DeepSpeed's universal checkpoint; full fine-tuning with adamw_8bit"
            " resumes at the same size: docs/recovery.md)"
        )
    t0 = time.monotonic()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # ranks are numbered node by node: the node's first rank names the folder, so two nodes sharing one
    # machine (tests) never write into the same one
    node_dir = os.path.join(staging, f"universal-rank{rank - local_rank}")
    tag = f"step-{step}"
    src, out = os.path.join(node_dir, "src", tag), os.path.join(node_dir, "universal", tag)
    names = sorted(n for n in hashes if n != Layout.CHECKPOINT_MARKER)
    fetched: list[str] = []
    error = ""
    if local_rank == 0:
        try:
            fetched = fetch(store, where, names, src, hashes, where)
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
            (universal.convert_unpartitioned if one_rank else universal.convert)(src, out)
        except Exception as e:  # every rank must reach the barrier below, then all fail together
            error = f"{type(e).__name__}: {e}"
    errors: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        bad = next(e for e in errors if e)
        if bad.startswith("PermanentError: "):
            raise PermanentError(bad.removeprefix("PermanentError: "))
        raise RuntimeError(f"converting {where} to DeepSpeed's universal checkpoint failed: {bad}")
    converted = time.monotonic()
    universal.load(engine, out, strict=full(engine))
    restore_rng(src, [f"rng_rank{rank % saved_world}.json"])
    dist.barrier()  # every rank of the node has read the folders
    if local_rank == 0:
        shutil.rmtree(node_dir, ignore_errors=True)
    if rank == 0:
        log_json(
            "checkpoint_converted",
            step=step,
            from_world_size=saved_world,
            to_world_size=dist.get_world_size(),
            fetch_convert_seconds=round(converted - t0, 2),
            load_seconds=round(time.monotonic() - converted, 2),
        )
    return fetched


def warm_start_tensors(store: Store, leaf: str, uri: str, staging: str) -> dict[str, torch.Tensor]:
    """spec.training.resumeFrom (`uri`, the key `leaf` of `store`): the adapter weights of a checkpoint (adapter
    format, hashes verified) keyed `param/<name>` as portable.gather saves them, or of an adapter directory
    keyed `adapter/<peft key>`."""
    from safetensors.torch import load_file

    field = "spec.training.resumeFrom"
    local = os.path.join(staging, "resume-from")
    if store.exists(f"{leaf}/{Layout.CHECKPOINT_MARKER}"):
        marker = read_marker(store, f"{leaf}/{Layout.CHECKPOINT_MARKER}")
        if marker.get("format") != ADAPTER:
            raise PermanentError(
                f"{field}: {uri} is a {marker.get('format')!r} checkpoint; a warm start reads adapter"
                " checkpoints (lora/qlora) or adapter directories"
            )
        fetch(store, leaf, [portable.STATE_FILE], local, marker.get("files") or {}, uri)
        return load_file(os.path.join(local, portable.STATE_FILE))
    weights = "adapter_model.safetensors"
    if store.exists(f"{leaf}/adapter_config.json") and store.exists(f"{leaf}/{weights}"):
        shutil.rmtree(local, ignore_errors=True)
        store.download_dir(leaf, local, keep=lambda n: n == weights)
        return {f"adapter/{k}": v for k, v in load_file(os.path.join(local, weights)).items()}
    raise PermanentError(
        f"{field}: {uri} is neither a complete checkpoint (no COMPLETE marker) nor an adapter directory"
        " (adapter_config.json and adapter_model.safetensors)"
    )


def adapter_key(param_name: str) -> str:
    """peft's saved key of a trainable parameter: without our wrapper's `lm.` and the adapter name."""
    return param_name.removeprefix("lm.").replace(".default", "")


def warm_start(engine: Any, tensors: Mapping[str, torch.Tensor]) -> int:
    """Load warm-start weights (no optimizer state) into the trainable parameters; return how many."""
    want = {n: p for n, p in portable.trainable(engine.module)}
    by_param: dict[str, torch.Tensor] = {}
    for name, p in want.items():
        t = tensors.get(f"param/{name}")
        if t is None:
            t = tensors.get(f"adapter/{adapter_key(name)}")
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if t is None or tuple(t.shape) != shape:
            got = "missing" if t is None else f"shape {tuple(t.shape)}"
            raise PermanentError(
                f"spec.training.resumeFrom: {name} is {got}, this spec's adapter needs {shape}: the warm start"
                " must come from an adapter with the same method.lora (r, targetModules, modulesToSave)"
            )
        by_param[f"param/{name}"] = t
    portable.scatter(engine, by_param, None)
    return len(by_param)
