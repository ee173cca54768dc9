"""`sftjob` command line entry point (filled in by later issues)."""


def main() -> int:
    return 0
