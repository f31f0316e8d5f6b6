"""Fault injection on launched runs: workers killed or stopped, the launcher signalled, edited
plans, outputs that cannot be written. Each test asserts the exit code, the one line the user
reads, how long the run took to end, and what is left on disk.

Workers are found through their heartbeat files: ``TMPDIR`` points the launcher's private
folder into the test's own, which also shows that nothing is left behind there.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from hybridiff import files
from hybridiff.errors import HybridiffError
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.session import RunOptions, execute
from tests.conftest import HYBRIDIFF, invoke
from tests.test_plan import _broken

#: Enough work that a fault lands mid-run: 12 images of 30 steps take seconds on 2 workers.
LONG_RUN = ["--prompt", "a red cube", "--num-images-per-prompt", "12", "--steps", "30", "--threads", "1"]


class Run:
    """A launched ``hybridiff run`` in its own session, so signals reach only what a test aims at."""

    def __init__(self, plan: Path, tmp_path: Path, *args: str, timeout_s: int = 60) -> None:
        self.out, self.tmp = tmp_path / "out", tmp_path / "tmp"
        self.tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmp), "HYBRIDIFF_TIMEOUT_S": str(timeout_s)}
        command = [HYBRIDIFF, "run", str(plan), *args, "-o", str(self.out)]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the workers that have started beating."""
        found = {}
        for beat in self.tmp.glob("hybridiff-*/heartbeat/rank-*"):
            words = beat.read_text().split()
            if words:
                found[int(beat.name.split("-")[1])] = int(words[0])
        return found

    def wait_until(self, ready, what: str, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while not ready():
            assert self.proc.poll() is None, f"the run ended before {what}: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"no {what} within {limit_s} s"
            time.sleep(0.05)

    def wait_for_images(self) -> None:
        self.wait_until(lambda: bool(self.report() and self.report()["images"]), "image in report.json")

    def report(self) -> dict | None:
        try:
            return json.loads((self.out / "report.json").read_text())
        except (OSError, ValueError):
            return None

    def finish(self, limit_s: float = 60) -> tuple[int, str, float]:
        """(exit code, stderr, seconds it took to end from now)."""
        start = time.monotonic()
        _, stderr = self.proc.communicate(timeout=limit_s)
        return self.proc.returncode, stderr, time.monotonic() - start


def _one_line(stderr: str, pattern: str) -> None:
    assert "Traceback" not in stderr and "gloo" not in stderr.lower(), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), stderr


def _assert_ended(run: Run, code: int, within_s: float, pattern: str, status: str) -> dict:
    """The run ends with ``code`` within ``within_s`` and one line; what it leaves is consistent.
    Returns the report."""
    got, stderr, seconds = run.finish()
    assert got == code and seconds < within_s, (got, seconds, stderr)
    _one_line(stderr, pattern)
    _assert_left_consistent(run, status)
    return run.report()


def _assert_left_consistent(run: Run, status: str) -> None:
    """The report says how the run ended, lists only images on disk, and nothing half-written
    or temporary is left (the launcher's folder, elastic's, write_atomic's)."""
    report = run.report()
    assert report is not None and report["status"] == status, report
    listed = {entry["image"] for entry in report["images"]}
    assert all((run.out / name).is_file() for name in listed)
    assert not list(run.out.glob(".*.tmp"))
    assert not list(run.tmp.glob("hybridiff-*")) and not list(run.tmp.glob("torchelastic_*"))


def test_a_worker_killed_while_loading_fails_the_run_naming_it(plan_path, tmp_path):
    run = Run(plan_path, tmp_path, *LONG_RUN)
    run.wait_until(lambda: 1 in run.ranks(), "heartbeat of rank 1")
    os.kill(run.ranks()[1], signal.SIGKILL)
    report = _assert_ended(run, 2, 10, r"worker rank 1 was killed by SIGKILL", "failed")
    assert not report["images"] and not list(run.out.glob("image-*.png"))


def test_a_worker_killed_mid_run_keeps_the_images_already_written(plan_path, tmp_path):
    run = Run(plan_path, tmp_path, *LONG_RUN)
    run.wait_for_images()
    os.kill(run.ranks()[1], signal.SIGKILL)
    report = _assert_ended(run, 2, 10, r"worker rank 1 was killed by SIGKILL", "failed")
    assert 1 <= len(report["images"]) < 12


def test_a_stopped_worker_is_named_within_half_the_timeout(plan_path, tmp_path):
    run = Run(plan_path, tmp_path, *LONG_RUN, timeout_s=8)
    run.wait_for_images()
    os.kill(run.ranks()[1], signal.SIGSTOP)
    # within the heartbeat limit (8 / 2 s) and the time to stop the workers
    _assert_ended(run, 2, 4 + 5, r"worker rank 1 stopped responding: no heartbeat for \d+ s", "failed")


def _listening(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets the processes ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.append(fields[1].split(":")[0])
    return addresses


def test_sigint_to_the_launcher_ends_with_130_and_a_closed_report_and_nothing_listens_outside(plan_path, tmp_path):
    run = Run(plan_path, tmp_path, *LONG_RUN)
    run.wait_for_images()
    addresses = _listening([run.proc.pid, *run.ranks().values()])
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert addresses and set(addresses) <= loopback, addresses  # gloo's pair sockets, on 127.0.0.1 only
    run.proc.send_signal(signal.SIGINT)
    report = _assert_ended(run, 130, 10, r"interrupted by SIGINT; \d+ image\(s\) and report.json \('interrupted'\)", "interrupted")
    assert 1 <= len(report["images"]) < 12


def _shared_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("hybridiff-*")} if Path("/dev/shm").is_dir() else set()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not; one reaped while looked at is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _alive(pids: list[int], limit_s: float) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        alive = [pid for pid in pids if _running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _break_the_output_folder(run: Run) -> None:
    """Rank 0's next write raises: its output folder has become a file."""
    shutil.rmtree(run.out)
    run.out.write_text("")


#: Five crashes mid-run, each kind the README names: the launcher killed (twice: the workers are
#: left to clean up alone), a worker killed, Ctrl-C, and an exception in a worker.
CRASHES = [
    lambda run: run.proc.kill(),
    lambda run: os.kill(run.ranks()[1], signal.SIGKILL),
    lambda run: run.proc.send_signal(signal.SIGINT),
    _break_the_output_folder,
    lambda run: run.proc.kill(),
]


def test_five_crashes_in_a_row_leave_no_shared_block_temporary_folder_or_process(plan_path, tmp_path):
    blocks_before = _shared_blocks()
    for n, crash in enumerate(CRASHES):
        (tmp_path / str(n)).mkdir()
        run = Run(plan_path, tmp_path / str(n), *LONG_RUN)
        run.wait_for_images()
        processes = [run.proc.pid, *run.ranks().values()]
        crash(run)
        code, stderr, _ = run.finish()
        assert code != 0, stderr
        assert _alive(processes, 5) == [], f"crash {n}: processes left"
        assert _shared_blocks() == blocks_before, f"crash {n}: shared blocks left"
        left = [p.name for p in run.tmp.iterdir() if not p.name.startswith("torchinductor_")]  # a cache, kept on purpose
        assert left == [], f"crash {n}: temporary files left"
        if code == -signal.SIGKILL:  # the launcher's own death: its workers closed the report
            assert run.report()["status"] == "failed" and "launcher ended" in run.report()["error"]


def test_sigterm_ends_a_single_process_run_with_143_and_a_closed_report(plan_path, tmp_path):
    run = Run(plan_path, tmp_path, *LONG_RUN, "--serial")
    run.wait_for_images()
    run.proc.send_signal(signal.SIGTERM)
    _assert_ended(run, 143, 5, r"interrupted by SIGTERM", "interrupted")


def test_an_edited_cut_tensor_is_a_plan_error_before_anything_reaches_gloo(plan_path, tmp_path):
    def wider_cut(d):
        d["cut_tensors"][0]["shape"][-1] += 1

    run = Run(_broken(plan_path, tmp_path, wider_cut), tmp_path, "--prompt", "x", "--threads", "1")
    cut = r"cut tensor \S+ is float32 \[.*\] for 1 row\(s\) at 128x128, but the plan says float32 .*recompile it"
    _assert_ended(run, 2, 60, cut, "failed")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["model"].update(height=192), r"for 1 row\(s\) at 192x128, but the plan says"),
        (lambda d: d["model"].update(dtype="float16"), r"is float16 .* but the plan says float32"),
        (lambda d: d["stages"][1]["nodes"].append("no_such_node"), r"names node 'no_such_node'.*recompile"),
        (lambda d: d["graph"].update(refined=["no.such.block"]), r"opens block 'no.such.block'.*recompile"),
    ],
)
def test_a_plan_edited_against_its_model_is_refused_in_one_line(plan_path, tmp_path, edit, message):
    result = invoke("run", str(_broken(plan_path, tmp_path, edit)), "--prompt", "x", "--emulate", "-o", str(tmp_path / "o"))
    assert result.returncode == 2
    _one_line(result.stderr, message)


def test_the_watchdog_kills_and_names_a_rank_whose_heartbeat_stopped(tmp_path):
    from hybridiff.runtime.watchdog import Watchdog

    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    for rank, proc in enumerate(sleepers):
        (tmp_path / f"rank-{rank}").write_text(f"{proc.pid} 7")
    os.utime(tmp_path / "rank-1", (time.time() - 10, time.time() - 10))  # rank 1 beat 10 s ago
    dog = Watchdog(tmp_path, ranks=[0, 1], timeout=8)
    start = time.monotonic()
    dog.start()
    codes = [proc.wait(timeout=5) for proc in sleepers]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL] and time.monotonic() - start < 2
    assert dog.verdict.startswith("worker rank 1 stopped responding: no heartbeat for 10 s (limit 4 s")


def test_a_timeout_is_blamed_on_the_rank_that_fell_behind_not_on_the_one_that_waited(tmp_path):
    from hybridiff.runtime.launch.launcher import _explain
    from hybridiff.runtime.watchdog import Watchdog

    beats, errors = tmp_path / "heartbeat", tmp_path / "errors"
    beats.mkdir()
    errors.mkdir()
    (beats / "rank-0").write_text("1 40")
    (beats / "rank-1").write_text("2 13")
    (errors / "rank-0.fault").write_text(
        "worker rank 0 failed: DistBackendError: Timed out (it waited longer than HYBRIDIFF_TIMEOUT_S=60 s for a peer)"
    )
    line = _explain({}, errors, Watchdog(beats, ranks=[0, 1], timeout=60))
    assert line == "worker rank 1 stopped making progress (13 steps done, others reached 40); its peers timed out waiting for it"


@pytest.mark.parametrize(
    "code, line",
    [
        (errno.ENOSPC, r"cannot write \S+: no space left in .*out \([\d.]+ MB free, [\d.]+ MB needed\); free some space"),
        (errno.EROFS, r"cannot write \S+: .*out is not writable \(Read-only file system\); choose a writable place"),
    ],
    ids=["disk full", "read-only"],
)
def test_an_output_folder_that_fills_up_or_turns_read_only_mid_run_is_one_line_and_keeps_what_was_written(
    plan_path, tmp_path, monkeypatch, code, line
):
    real_replace, given_out = os.replace, []

    def replace(src, dst):
        if given_out:
            raise OSError(code, os.strerror(code))
        real_replace(src, dst)
        given_out.extend([True] if Path(dst).name == "image-0.png" else [])  # the disk gives out after the first image

    monkeypatch.setattr(files.os, "replace", replace)
    requests = tuple(ImageRequest("a red cube", None, seed) for seed in (0, 1))
    out = tmp_path / "out"
    with pytest.raises(HybridiffError, match=line):
        execute(RunOptions(plan=plan_path, requests=requests, out=out, mode="serial", threads=1, steps=4))
    # what was written is intact (the report from before: the disk had no room for a newer one),
    # and nothing half-written is left beside it
    assert sorted(p.name for p in out.iterdir()) == ["image-0.png", "report.json"]
    Image.open(out / "image-0.png").verify()
