"""Data curation: weighted source mixtures, exact and near-duplicate removal, eval-set decontamination, an
optional perplexity filter, data gates, and the data report (see docs/data.md)."""

from . import cache
from .curate import Scorer, curate
from .report import DataReport

__all__ = ["DataReport", "Scorer", "cache", "curate"]
