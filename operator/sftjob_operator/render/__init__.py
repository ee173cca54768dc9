"""Pure functions of the operator: rendering children, computing phases, conditions, progress, stuck causes.

Nothing in this package does I/O or reads the clock: callers pass `now`. mypy --strict applies here.
"""
