"""`sftjob run` on bad data files (issue 14, part 6 and 8): the permanent exit code and the trainer's own
one-line error naming the file (and line), never torch's launcher traceback (ChildFailedError) as the
message. One case only: it starts the real trainer under torchrun (the loader itself is fuzzed in
tests/trainer/test_data_fuzz.py)."""

from __future__ import annotations

import re
import subprocess

import pytest

from .sftjob_cli import CLI, write_spec
from .test_sftjob_run import spec_doc

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # invalid UTF-8, a BOM before broken JSON, a null byte, CRLF: nothing usable
        (
            b"\xef\xbb\xbf{broken\r\n"
            + b'{"instruction": "\xff\xfe", "output": "b"}\r\n'
            + b'{"a\x00": 1}\r\n',
            [r"train\.jsonl:1\b", "malformed_json=2", "invalid_utf8=1", r"train\.jsonl:2: byte"],
        ),
        # (an empty file: tests/trainer/test_data_fuzz.py, without the minutes a run costs)
    ],
    ids=["nothing-usable"],
)
def test_bad_data_fails_permanent_with_the_trainers_message(tiny_model_dir, tmp_path, data, expected):
    (tmp_path / "train.jsonl").write_bytes(data)
    (tmp_path / "eval.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    spec = write_spec(tmp_path / "run.yaml", spec_doc(tiny_model_dir))
    proc = subprocess.run(
        [*CLI, "run", spec, "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    [failed] = [line for line in out.splitlines() if "phase Failed" in line]
    for part in expected:
        assert re.search(part, failed), failed
    assert "ChildFailedError" not in out and "Traceback" not in out, out[-3000:]
