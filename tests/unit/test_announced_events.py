"""Which phase changes the operator posts as Events: the ends, suspensions and resumptions, and a new reason
of Failed; not the progress phases in between (status.conditions has those, with transition times)."""

from __future__ import annotations

import pytest

from sftjob_api import Phase
from sftjob_operator.handlers.events import announced


@pytest.mark.parametrize(
    "prev, new, posted",
    [
        (None, Phase.PENDING, False),
        (None, Phase.CURATING, False),
        (Phase.PENDING, Phase.TRAINING, False),
        (Phase.TRAINING, Phase.EVALUATING, False),
        (Phase.EVALUATING, Phase.MERGING, False),
        (Phase.MERGING, Phase.SUCCEEDED, True),
        (Phase.TRAINING, Phase.FAILED, True),
        (None, Phase.FAILED, True),  # InvalidSpec on the first look
        (Phase.FAILED, Phase.FAILED, True),  # a new reason
        (Phase.SUCCEEDED, Phase.SUCCEEDED, False),
        (Phase.TRAINING, Phase.SUSPENDED, True),
        (Phase.SUSPENDED, Phase.PENDING, True),
    ],
)
def test_announced(prev: Phase | None, new: Phase, posted: bool) -> None:
    assert announced(prev, new) is posted
