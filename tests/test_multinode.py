"""Two 'nodes' on loopback, each started with the documented torchrun command."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from hybridiff.runtime.run.requests import ImageRequest
from tests.equivalence import assert_workers_equal_emulation

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_torchrun_equal_the_emulation(plan_path, tmp_path):
    port = str(_free_port())
    out = tmp_path / "nodes"
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "120"}
    nodes = [
        subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", port,
             "-m", "hybridiff", "run", str(plan_path), "--prompt", "a red cube", "--seed", "0",
             "--threads", "1", "-o", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for rank in (0, 1)
    ]
    logs = []
    for node in reversed(nodes):  # node 1 first: its log explains a node 0 left waiting
        try:
            logs.append(node.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            node.kill()  # never leave a launcher behind
            logs.append(node.communicate()[0] + "\n(killed after 240 s)")
    assert [node.returncode for node in nodes] == [0, 0], logs
    hybrid, _ = assert_workers_equal_emulation(plan_path, tmp_path, [ImageRequest("a red cube", None, 0)], launched=out)
    assert "window" in hybrid["images"][0]["phases"]
