"""Files generated from the code and committed (the CRD, the chart's admission policy): one command line for
each generator — print it, `--write` it, or `--check` that the committed copy is current (CI's tests)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def generated_file_main(
    argv: list[str] | None, doc: str | None, target: Path, render: Callable[[], str], module: str
) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {target.relative_to(REPO_ROOT)}")
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        target.write_text(text)
        print(f"wrote {target}")
    elif args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is stale: run python -m {module} --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0
