"""`python -m sftjob_operator`: run the operator (flags: --help)."""

from .main import main

main()
