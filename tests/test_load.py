"""compile and bench notice a loaded machine before they measure on it."""

import multiprocessing as mp
import os
import time

import pytest

from hybridiff import load
from hybridiff.compiler.entries import compile_model
from tests.conftest import MODEL, TEST_SCHEDULE

pytestmark = pytest.mark.skipif(load.busy_cores() is None, reason="this system does not report per-core times")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.fixture
def every_core_busy():
    """One spinning process per usable core, for a few seconds."""
    spinners = [mp.get_context("fork").Process(target=_spin, args=(8.0,)) for _ in os.sched_getaffinity(0)]
    for p in spinners:
        p.start()
    time.sleep(0.3)
    yield
    for p in spinners:
        p.terminate()
        p.join()


def test_other_processes_keeping_the_cores_busy_are_seen_and_warned_of(every_core_busy, capfd):
    usable = len(os.sched_getaffinity(0))
    busy = load.busy_cores()
    assert busy > usable - 0.5
    warning = load.load_warning(busy, 2, "this bench")
    assert warning.startswith(f"warning: other processes keep {busy:.1f} of this machine's {usable} cores busy, and this bench needs 2")
    assert warning.endswith("measure on a quiet machine")
    # a timed compile says so before it measures, and the plan keeps the figure
    plan = compile_model(MODEL, schedule=TEST_SCHEDULE, repeats=1, threads=1, gpus=2)
    assert "warning: other processes keep" in capfd.readouterr().err
    assert plan.estimates.background_busy_cores > usable - 0.5


def test_free_cores_enough_for_the_work_are_no_reason_to_warn(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert load.load_warning(1.5, 2, "this bench") is None  # 2.5 cores free for 2 workers
    assert load.load_warning(2.7, 2, "this bench") is not None
    assert load.load_warning(None, 4, "this bench") is None  # nothing known: nothing said
