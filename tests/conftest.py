"""Shared fixtures: the real test bed (see docs/testing.md).

Fixtures
  s3            function  a fresh bucket on a session-wide SeaweedFS S3 server (testbed.seaweed.S3Bucket)
  kube          session   the real control plane with KWOK GPU nodes (testbed.kube.Cluster)
  namespace     function  a fresh namespace name in `kube`, deleted afterwards
  prometheus    session   a real Prometheus (testbed.prom.Prometheus)
  testbed_logs  session   directory holding every component's log
  tiny_model_dir session  a tiny Llama + BPE tokenizer saved offline (trainer.tiny), shared by the trainer
                          and pipeline tests
  two_rank_reference session  the uninterrupted 2-rank run the crash tests compare with (trainer.reference),
                          computed once for all workers
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import suite_order
from testbed import procs
from testbed.seaweed import S3Bucket, SeaweedServer

TESTBED_FIXTURES = {"kube", "namespace", "s3", "seaweed_server", "prometheus"}

# Workers share the machine's cores: each torch process (and what it starts) gets its share of OpenMP
# threads. Oversubscribed OpenMP threads spin: four workers of two threads each on two cores ran a small
# torch loop 6x slower than one thread each (docs/testing.md, "In parallel").
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(scope="session")
def testbed_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logs of every component; SFTJOB_TESTBED_LOGS keeps them somewhere stable (e.g. a CI artifact dir)."""
    chosen = os.environ.get("SFTJOB_TESTBED_LOGS")
    # one directory per xdist worker: each runs a test bed of its own, whose logs share names
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    path = Path(chosen) / worker if chosen else tmp_path_factory.mktemp("testbed-logs")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), testbed_logs).start()
    yield server
    server.stop()


@pytest.fixture
def s3(seaweed_server: SeaweedServer) -> S3Bucket:
    return seaweed_server.new_bucket()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path):  # -> testbed.kube.Cluster
    from testbed.kube import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("kube"), testbed_logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def namespace(kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = kube.create_namespace(request.node.name)
    yield name
    kube.delete_namespace(name)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory, testbed_logs: Path):  # -> testbed.prom.Prometheus
    from testbed.prom import Prometheus

    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), testbed_logs)
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from trainer.tiny import make_model_dir

    return make_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def two_rank_reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str
):  # -> trainer.reference.Reference
    from trainer.reference import two_rank_reference

    base = tmp_path_factory.getbasetemp()
    shared = (
        base.parent if hasattr(request.config, "workerinput") else base
    )  # an xdist worker: the run's root
    return two_rank_reference(shared / "two-rank-reference", tiny_model_dir)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On a failure of a test using the test bed, attach the tail of every running component's log."""
    report = yield
    if report.failed and procs.RUNNING and TESTBED_FIXTURES & set(getattr(item, "fixturenames", ())):
        for proc in list(procs.RUNNING):
            report.sections.append((f"testbed log: {proc.name} ({proc.log_path})", proc.tail(20)))
    return report


# ---- order and accounting by module (tests/suite_order.py) ---------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write each module's total time to {suite_order.DURATIONS_FILE.name} (what orders the modules)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    durations = suite_order.load_durations()
    order = suite_order.longest_first([i.nodeid for i in items], durations)
    items[:] = [items[i] for i in order]
    for item in items:
        if suite_order.is_quick(suite_order.module_of(item.nodeid), durations):
            item.add_marker(pytest.mark.quick)


_TIMES: list[tuple[str, float]] = []
MODULE_CPU_LOG = "SFTJOB_MODULE_CPU_LOG"  # benchmarks/suite_profile.py sets it: CPU seconds per module


@pytest.fixture(scope="module", autouse=True)
def _module_cpu(request: pytest.FixtureRequest) -> Iterator[None]:
    """Where the cores go: this worker's CPU time and that of the processes it started and reaped (test
    beds, trainer launches), from before the module's first fixture to after its last teardown (autouse
    fixtures come first). Not counted: session fixtures, and pods' processes (children of containerd)."""
    log = os.environ.get(MODULE_CPU_LOG)
    if not log:
        yield
        return

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    cpu0, wall0 = cpu(), time.monotonic()
    yield
    row = {
        "module": request.node.nodeid,
        "cpu_s": round(cpu() - cpu0, 1),
        "wall_s": round(time.monotonic() - wall0, 1),
    }
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _TIMES.append((report.nodeid, report.duration))  # under xdist: the controller sees every worker's


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") or not _TIMES:
        return
    totals = suite_order.module_totals(_TIMES)
    terminalreporter.write_sep("=", f"slowest modules (of {len(totals)}; setup + call + teardown)")
    for module, seconds in list(totals.items())[:25]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")
    if config.getoption("--record-durations") and not config.getoption("--last-failed", default=False):
        suite_order.write_durations(totals)
        terminalreporter.write_line(f"recorded in {suite_order.DURATIONS_FILE}")
