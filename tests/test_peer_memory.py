"""The one-shot all-reduce through GPU peer memory (parallel/peer_memory.py): which tensors and groups
take it, on CPU; the sums themselves on two GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel import groups, peer_memory
from parallel.groups import Group
from parallel.layers import all_reduce

REPO = Path(__file__).resolve().parents[1]


def test_only_aligned_small_bf16_or_fp32_tensors_are_taken():
    hidden = 2880  # a row of either model: 5,760 bytes in bf16, 11,520 in fp32
    limit = 64 * hidden * 2
    assert peer_memory.takes(torch.zeros(64, hidden, dtype=torch.bfloat16), limit)
    assert peer_memory.takes(torch.zeros(32, hidden, dtype=torch.float32), limit)
    assert not peer_memory.takes(torch.zeros(65, hidden, dtype=torch.bfloat16), limit)  # too large
    assert not peer_memory.takes(torch.zeros(0, hidden, dtype=torch.bfloat16), limit)  # nothing to sum
    assert not peer_memory.takes(torch.zeros(4, hidden, dtype=torch.float16), limit)  # not summed there
    assert not peer_memory.takes(torch.zeros(4, hidden, dtype=torch.int64), limit)
    assert not peer_memory.takes(torch.zeros(3, 5, dtype=torch.bfloat16), limit)  # 30 bytes
    assert not peer_memory.takes(torch.zeros(hidden, 4, dtype=torch.bfloat16).t(), limit)  # strided
    rows = torch.zeros(8, hidden + 8, dtype=torch.bfloat16)
    assert peer_memory.takes(rows[1:].view(-1)[:hidden], limit)  # starts 5,776 bytes in: aligned
    assert not peer_memory.takes(rows.view(-1)[1:1 + hidden], limit)  # starts 2 bytes in


def test_a_group_off_the_gpu_or_of_one_rank_has_no_peer_memory():
    assert "cpu" in peer_memory.unavailable_reason(object(), torch.device("cpu"))
    with pytest.warns(UserWarning, match="peer-memory all-reduce off.*cpu"):
        assert peer_memory.for_group(None, torch.device("cpu")) is None


class RecordingPeer:
    """Stands in for PeerAllReduce: takes tensors of at most `limit` bytes, doubles them (as two ranks
    holding the same values would sum), and records what it was given."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, []

    def fits(self, t: torch.Tensor) -> bool:
        return peer_memory.takes(t, self.limit)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(t.shape))
        return t.mul_(2)


def test_all_reduce_takes_the_peer_path_only_for_what_it_fits(tmp_path):
    """Small tensors go to the group's peer all-reduce, in place; the others, and every tensor of a
    group without one, to torch.distributed (here a gloo world of one, which leaves them as they are)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        peer = RecordingPeer(limit=4 * 2880 * 2)
        g = Group(dist.group.WORLD, 0, 2, (0, 1), peer)
        small = torch.ones(4, 2880, dtype=torch.bfloat16)
        assert all_reduce(small, g) is small and bool((small == 2).all())
        large = torch.ones(5, 2880, dtype=torch.bfloat16)
        assert all_reduce(large, g) is large and bool((large == 1).all())
        ids = torch.ones(16, dtype=torch.int64)  # the experts' load counts: never the peer path
        assert bool((all_reduce(ids, g) == 1).all())
        plain = torch.ones(4, 2880, dtype=torch.bfloat16)
        assert bool((all_reduce(plain, Group(dist.group.WORLD, 0, 2, (0, 1))) == 1).all())
        assert peer.calls == [(4, 2880)]
    finally:
        dist.destroy_process_group()


def test_every_group_that_all_reduces_activations_asks_for_peer_memory_once_per_communicator(monkeypatch):
    asked = []

    def for_group(group, device):
        asked.append(group)
        return f"peer of {group}"

    monkeypatch.setattr(peer_memory, "for_group", for_group)
    shared, other = object(), object()
    tp, split, replica = (Group(shared, 0, 2, (0, 1)), Group(shared, 0, 2, (0, 1)),
                          Group(other, 1, 4, (0, 1, 2, 3)))
    alone = Group(None, 0, 1, (0,))
    parallel = groups.Parallel(1, 4, groups.Layout(tp=2, ep=2), torch.device("cuda", 0), tp, split, alone,
                               replica, 0)
    groups.use_peer_memory(parallel)
    assert asked == [shared, other]
    assert tp.peer == split.peer == f"peer of {shared}" and replica.peer == f"peer of {other}"
    assert alone.peer is None
    groups.use_peer_memory(parallel)  # a second LLM in the same job: set up once
    assert asked == [shared, other]


def test_attention_dp_gives_its_replica_no_peer_memory(monkeypatch):
    """Under attention_dp the replica exchanges rows all-to-all and all-reduces nothing: a peer buffer
    there would be 512 KiB of every GPU's memory and a set-up for nothing."""
    asked = []
    monkeypatch.setattr(peer_memory, "for_group", lambda group, device: asked.append(group) or "peer")
    alone = Group(None, 0, 1, (0,))
    replica = Group(object(), 1, 2, (0, 1))
    parallel = groups.Parallel(1, 2, groups.Layout(ep=2, attention_dp=True), torch.device("cuda", 0),
                               alone, alone, replica, replica, 0)
    groups.use_peer_memory(parallel)
    assert asked == [] and replica.peer is None


def _agree_worker(rank: int, store: str, answers):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mine = "no peer access" if rank == 1 else None
        answers.put((rank, peer_memory._agreed(mine, dist.group.WORLD, torch.device("cpu")),
                     peer_memory._agreed(None, dist.group.WORLD, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_one_rank_that_cannot_take_part_turns_the_one_shot_off_for_every_rank(tmp_path):
    """The ranks agree before the buffer's exchange, which every rank must join: a rank whose check
    failed keeps its reason, the others get one too; where none failed, none has one."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, str(tmp_path / "store"), answers)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict((rank, (first, second)) for rank, first, second in (answers.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert got == {0: ("another rank of the group could not take part", None), 1: ("no peer access", None)}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_shot_all_reduce_on_two_gpus_equals_nccl(tmp_path):
    """On two GPUs, eager and replayed from a CUDA graph, bf16 and fp32, 1 to 64 rows of 2,880: every
    rank gets the same bits, equal to NCCL's sum (two terms: one rounding either way)."""
    out = tmp_path / "all_reduce.json"
    env = {**os.environ, "GPT_OSS_PEER_ALL_REDUCE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "scripts/parallel_bench.py",
         "--all-reduce", "--no-model", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["all_reduce"]
    peer = [r for r in rows if r["path"] == "peer"]
    assert peer and all(r["same_on_every_rank"] and r["max_abs_diff_vs_nccl"] == 0 and r["graph_equals_eager"]
                    for r in peer), rows
