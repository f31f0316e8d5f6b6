"""Moving predictions and cut tensors between CPU workers: shared memory between local workers,
and who binds to which cores."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridiff import device as devices
from hybridiff.errors import HybridiffError
from hybridiff.runtime.comm import shared
from hybridiff.runtime.comm.shared import SharedExchange
from hybridiff.runtime.comm.transport import DistTransport

pytestmark = pytest.mark.skipif(not shared.supported(), reason="shared-memory exchange is for x86-64")


def _rows(rank: int, n: int, dtype: torch.dtype, step: int) -> torch.Tensor:
    return (torch.arange(n * 6, dtype=torch.float32).view(n, 2, 3) + 100 * rank + 1000 * step).to(dtype)


def _exchanges(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        exchange = SharedExchange((0, 1), rank, None, timeout_s=1.0)
        # sizes grow past the first block (it is made again), one member may give nothing
        for step, (sizes, dtype) in enumerate([([1, 1], torch.float32), ([3, 0], torch.float16), ([2, 5], torch.float32)]):
            template = torch.empty(1, 2, 3, dtype=dtype)
            exchange.publish(_rows(rank, sizes[rank], dtype, step), sizes, template)
            exchange.wait()
            got = exchange.read(sizes, template)
            assert [g.tolist() for g in got] == [_rows(m, n, dtype, step).tolist() for m, n in enumerate(sizes) if n]
        if rank == 0:  # rank 1 never comes: the wait ends with an error that names it
            exchange.publish(_rows(0, 1, torch.float32, 9), [1, 1], torch.empty(1, 2, 3))
            with pytest.raises(HybridiffError, match=r"rank\(s\) \[1\] did not reach the step's exchange within 1 s"):
                exchange.wait()
        dist.barrier()
        exchange.close()
    finally:
        dist.destroy_process_group()


def test_shared_memory_exchange_gives_every_member_all_rows_and_names_a_missing_one():
    mp.spawn(_exchanges, args=(29500 + os.getpid() % 1000,), nprocs=2)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("hybridiff-")], "no shared block left behind"


def _message(index: int) -> list[torch.Tensor]:
    """Cut tensors of several dtypes; message 1 outgrows the first block (64 KiB)."""
    rows = 400 if index == 1 else 1 + index % 3
    dtype = (torch.float32, torch.float16, torch.bfloat16)[index % 3]
    return [(torch.arange(rows * 96, dtype=torch.float32).view(rows, 96) + index).to(dtype), torch.arange(index + 1)]


def _cut_tensors(rank: int, port: int, shared_memory: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        transport = DistTransport([(0, 1)], shared=shared_memory, timeout_s=1.0)
        messages = [_message(i) for i in range(7)]  # more than a ring holds: the sender waits for the reader
        if rank == 0:
            for tensors in messages:
                transport.post(0, 1, tensors)
            transport.flush()
        else:
            time.sleep(0.2)
            for tensors in messages:
                got = transport.take(0, 1, [torch.empty_like(t) for t in tensors])
                assert [(g.dtype, g.tolist()) for g in got] == [(t.dtype, t.tolist()) for t in tensors]
            transport.post(1, 0, messages[2])
        if rank == 0:
            assert transport.take(1, 0, [torch.empty_like(t) for t in messages[2]])[1].tolist() == [0, 1, 2]
        kind = "shared memory" if shared_memory else "gloo"
        assert transport.links == {"0->1": kind, "1->0": kind}
        if shared_memory and rank == 1:  # rank 0 never sends this one: the wait names it
            with pytest.raises(HybridiffError, match="rank 0 did not send its cut tensors within 1 s"):
                transport.take(0, 1, [torch.empty(3)])
        dist.barrier()
        transport.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "gloo"])
def test_cut_tensors_arrive_in_order_with_their_dtypes_over_either_link(shared_memory):
    mp.spawn(_cut_tensors, args=(29500 + (os.getpid() + 7 * shared_memory) % 1000, shared_memory), nprocs=2)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("hybridiff-")], "no shared block left behind"


def test_workers_keep_cores_of_their_own_only_where_their_threads_fit(monkeypatch):
    monkeypatch.setattr(devices, "available_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [devices.placement(r, 2, 2).cores for r in (0, 1)] == [{0, 1}, {2, 3}]
    assert devices.placement(1, 4).cores == {1} and devices.placement(0, 4).threads == 1
    assert devices.placement(0, 3, 2).cores is None  # 6 threads on 4 cores: share, do not bind
    monkeypatch.setenv("HYBRIDIFF_CPU_BIND", "0")
    assert devices.placement(0, 2, 1).cores is None
