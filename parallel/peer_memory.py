"""One-shot all-reduce through GPU peer memory, for tensor parallelism's small all-reduces.

A decode step under tensor parallelism all-reduces a few rows per layer (the attention's output
projection, and the experts' partial sums where their intermediate dimension is split): kilobytes,
where NCCL's ring costs several of its protocol's round trips. Here every rank copies its part into
a buffer that the group's other GPUs map (PyTorch's symmetric memory, over NVLink), the ranks meet
at a flag barrier, and each reads every rank's copy and sums them itself: one launch, one hop
(PyTorch's `symm_mem.one_shot_all_reduce_copy_out`, whose kernel also waits, before it returns, until
every rank has read its buffer, so the next call may overwrite it). Every rank sums the copies in
rank order, so every rank gets the same bits, which tensor parallelism needs (its ranks sample the
same token from the same logits).

Used only where it can work and pays: a CUDA group whose ranks share one host and reach each other's
memory, tensors of at most `ONE_SHOT_MAX_BYTES` (beyond, each rank reading every copy whole loses to
NCCL's bandwidth-optimal algorithms), bf16 or fp32, 16-byte aligned. Everything else, and every
group on CPU (gloo), goes to torch.distributed as before. The choice is made once per group at
start-up, by every rank of it together (a rank that cannot map its peers turns it off for all), and
per tensor by its size, which is the same on every rank.

NVLink multicast stays off (TORCH_SYMM_MEM_DISABLE_MULTICAST): the one-shot reads peers' memory
with plain loads, and multicast objects are not to be created on the machines this was built on.

`GPT_OSS_PEER_ALL_REDUCE=1` turns it on (runtime/options.py); off by default until it has run on
several GPUs (docs/performance.md, "Scaling over GPUs").
"""

from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist

# Beyond this a reduce goes to NCCL: each rank reads world x bytes here. PyTorch's measurements put
# the one-shot ahead of NCCL's ring below ~400 KB on 8 H100s; a decode step's attention all-reduce is
# 5.6 KB a row (bf16, 2,880 features), so graphs of up to 91 rows take this path.
ONE_SHOT_MAX_BYTES = 512 << 10
ALIGNMENT = 16  # bytes: the kernel's vector width, for the buffer's and the tensor's start and size
DTYPES = (torch.bfloat16, torch.float32)  # what PyTorch's kernel sums


def _no_multicast() -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


class PeerAllReduce:
    """The one-shot all-reduce of one process group (made by `for_group`, on every rank of it)."""

    def __init__(self, group, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        _no_multicast()
        self.max_bytes = max_bytes
        self.group_name = group.group_name
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, group)
        self.op = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    def fits(self, t: torch.Tensor) -> bool:
        return t.is_cuda and takes(t, self.max_bytes)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the group, in place (as dist.all_reduce). The kernel's threads copy and later
        write back the same elements, so t may be both its input and its output."""
        flat = t.view(-1)
        staged = self.buffer[:flat.numel() * flat.element_size()].view(t.dtype)
        self.op(staged, flat, "sum", self.group_name, flat)
        return t


def takes(t: torch.Tensor, max_bytes: int) -> bool:
    """Whether the one-shot kernel takes t (the device aside): its dtype, contiguous, at most
    max_bytes, and its start and size 16-byte aligned (as the staging buffer's are: PyTorch's kernel
    needs both at the same alignment)."""
    nbytes = t.numel() * t.element_size()
    return (t.dtype in DTYPES and t.is_contiguous() and 0 < nbytes <= max_bytes and nbytes % ALIGNMENT == 0
            and t.storage_offset() * t.element_size() % ALIGNMENT == 0)


def unavailable_reason(group, device: torch.device) -> str | None:
    """Why this rank cannot take part in a peer-memory all-reduce, or None (a local check)."""
    if device.type != "cuda":
        return f"the group runs on {device.type}, not CUDA"
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
    if group is None:
        return "a group of one"
    return None


def _peers_reachable(group, device: torch.device) -> str | None:
    """Every rank of the group on this host, its GPU mapped from ours (a collective over the group)."""
    mine = (socket.gethostname(), device.index)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    hosts = {host for host, _ in everyone}
    if len(hosts) > 1:
        return f"the group spans {len(hosts)} hosts"
    blocked = [index for _, index in everyone
               if index != device.index and not torch.cuda.can_device_access_peer(device.index, index)]
    return f"GPU {device.index} cannot access GPU(s) {blocked} as peers" if blocked else None


def _agreed(reason: str | None, group, device: torch.device) -> str | None:
    """reason, or, where this rank has none but another rank of the group has one, a reason too: every
    rank leaves with the same answer (one MIN all-reduce), so none goes on to a collective the others
    skip."""
    if group is None:
        return reason
    ok = torch.tensor([reason is None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return reason or (None if bool(ok.item()) else "another rank of the group could not take part")


def for_group(group, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES) -> PeerAllReduce | None:
    """The group's peer-memory all-reduce, or None where any rank of it cannot take part (every rank
    calls this together and gets the same answer; the first rank says why it is off). The ranks
    agree before making the buffer (whose exchange every rank must join) and again after."""
    reason = unavailable_reason(group, device)  # the same on every rank: one torch, one device type
    if reason is None:
        reason = _agreed(_peers_reachable(group, device), group, device)
    peer = None
    if reason is None:
        try:
            peer = PeerAllReduce(group, device, max_bytes)
        except Exception as e:  # noqa: BLE001 - any failure to map the peers means NCCL instead
            reason = f"symmetric memory failed: {type(e).__name__}: {e}"
        reason = _agreed(reason, group, device)
    if reason is not None:
        peer = None
        if group is None or dist.get_rank(group) == 0:
            warnings.warn(f"peer-memory all-reduce off, NCCL instead: {reason}", stacklevel=2)
    return peer
