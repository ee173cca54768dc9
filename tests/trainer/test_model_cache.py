"""The model cache's location ($SFTJOB_MODEL_CACHE) and the trainer image that bakes it in (no torch)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sftjob_api.exit_codes import PermanentError
from sftjob_trainer import model_cache

DOCKERFILE = Path(__file__).resolve().parents[2] / "trainer_image" / "Dockerfile"
NAME = "smollm2-135m-instruct"


def test_cache_root_from_env_else_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SFTJOB_MODEL_CACHE", raising=False)
    assert model_cache.cache_root() == str(tmp_path / "home" / ".cache" / "sftjob" / "models")
    monkeypatch.setenv("SFTJOB_MODEL_CACHE", "")  # empty counts as unset
    assert model_cache.cache_root() == str(tmp_path / "home" / ".cache" / "sftjob" / "models")
    monkeypatch.setenv("SFTJOB_MODEL_CACHE", "/opt/sftjob/models")
    assert model_cache.cache_root() == "/opt/sftjob/models"
    assert model_cache.model_dir(NAME) == f"/opt/sftjob/models/{NAME}"


def test_bare_name_resolves_in_a_prepared_cache_without_preparing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the trainer image: the cache is baked in, pods only read it."""
    baked = tmp_path / "baked" / NAME
    baked.mkdir(parents=True)
    (baked / model_cache.MARKER).write_text("config.json\n")
    monkeypatch.setenv("SFTJOB_MODEL_CACHE", str(tmp_path / "baked"))

    def no_prepare(name: str, force: bool = False) -> str:
        raise AssertionError(f"prepare({name!r}) called although the cache holds it")

    monkeypatch.setattr(model_cache, "prepare", no_prepare)
    assert model_cache.resolve(NAME) == str(baked)
    assert model_cache.resolve("s3://models/x") == "s3://models/x"  # not a bare name: untouched

    monkeypatch.setenv("SFTJOB_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PermanentError, match="not in the model cache"):
        model_cache.resolve(NAME, auto_prepare=False)


def test_trainer_image_bakes_every_known_model_into_its_cache() -> None:
    """The Dockerfile cannot be built here (no Docker engine): check what it says instead."""
    text = DOCKERFILE.read_text()
    env = re.search(r"^ENV SFTJOB_MODEL_CACHE=(\S+)$", text, re.M)
    assert env is not None, "trainer_image/Dockerfile sets no SFTJOB_MODEL_CACHE"
    assert os.path.isabs(env.group(1)) and not env.group(1).startswith(("/tmp", "/home")), env.group(1)
    for name in model_cache.KNOWN:
        prep = text.find(f"sftjob model prepare {name}")
        assert prep > env.end(), f"the image does not prepare {name} into $SFTJOB_MODEL_CACHE"
    # prepared after the code it runs is installed, readable by the non-root trainer user
    assert text.find("pip install --no-deps .") < text.find("sftjob model prepare") < text.find("USER 1000")
    assert "chmod -R a+rX" in text
