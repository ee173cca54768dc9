"""tests/suite_order.py: the order modules are handed to xdist workers, and what the record holds."""

from __future__ import annotations

import suite_order as so


def test_longest_module_first_tests_keep_their_order_inside_a_module() -> None:
    ids = ["a.py::t1", "b.py::t1", "a.py::t2", "c.py::t1", "b.py::t2"]
    order = so.longest_first(ids, {"a.py": 5.0, "b.py": 90.0, "c.py": 30.0})
    assert [ids[i] for i in order] == ["b.py::t1", "b.py::t2", "c.py::t1", "a.py::t1", "a.py::t2"]


def test_unrecorded_module_counts_as_mid_sized_and_ties_keep_collection_order() -> None:
    ids = ["short.py::t", "new.py::t", "other_new.py::t", "long.py::t"]
    durations = {"short.py": 1.0, "long.py": so.NEW_MODULE_S + 1}
    assert [ids[i] for i in so.longest_first(ids, durations)] == [
        "long.py::t",
        "new.py::t",
        "other_new.py::t",
        "short.py::t",
    ]


def test_module_totals_add_setup_call_teardown_per_module() -> None:
    reports = [("a.py::t1", 1.0), ("a.py::t1", 2.0), ("b.py::C::t", 0.5), ("a.py::t2", 0.25)]
    assert so.module_totals(reports) == {"a.py": 3.2, "b.py": 0.5}
    assert list(so.module_totals(reports)) == ["a.py", "b.py"]


def test_recording_merges_into_the_file_longest_first(tmp_path) -> None:
    path = tmp_path / "d.json"
    so.write_durations({"a.py": 3.0, "b.py": 1.0}, path)
    so.write_durations({"b.py": 7.0}, path)  # a partial run updates only what it ran
    assert so.load_durations(path) == {"b.py": 7.0, "a.py": 3.0}
    assert list(so.load_durations(path)) == ["b.py", "a.py"]


def test_quick_is_a_recorded_module_at_or_under_the_bound() -> None:
    durations = {"fast.py": so.QUICK_MODULE_S, "slow.py": so.QUICK_MODULE_S + 0.1}
    assert so.is_quick("fast.py", durations)
    assert not so.is_quick("slow.py", durations)
    assert not so.is_quick("unrecorded.py", durations)
