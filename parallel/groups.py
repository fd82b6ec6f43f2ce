"""Process groups: who this rank is and which ranks it talks to.

World = dp replicas x (tp x ep) ranks per model replica. Inside a replica:
- attention is tensor-parallel over `tp` consecutive ranks (and repeated over the ep groups);
- each expert's intermediate dimension is split over `expert_tp` consecutive ranks (default tp), and
  the experts themselves are partitioned over the remaining replica_size / expert_tp ranks.
So tp=1, ep=N is pure expert parallelism; tp=N, ep=1 splits every expert N ways (as OpenAI's
reference does); tp=N with expert_tp=1 keeps attention tensor-parallel but partitions whole experts
over all N ranks (vLLM's --enable-expert-parallel).

attention_dp (TensorRT-LLM's and SGLang's high-throughput layout for MoE; tp=1, ep=N): the replica's
N ranks share the experts but not the requests. Each rank schedules its own share, runs attention over
it with its own KV cache, and sends its tokens' rows to the experts' owners; the ranks step together
(an idle rank runs an empty step), so their all-to-alls pair up.

Groups come from torchrun's environment, from an explicit rank/world/address (Ray actors, tests),
or not at all (one process). NCCL on CUDA, gloo on CPU. World size 1 needs no torch.distributed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from parallel import heartbeat, peer_memory


class LayoutError(ValueError):
    """A parallel layout that does not fit the world or the model; the message says which number."""


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    dp: int = 1
    expert_tp: int | None = None  # None: the same as tp
    attention_dp: bool = False  # each rank of a replica schedules and attends over its own requests

    @property
    def replica_size(self) -> int:
        return self.tp * self.ep

    @property
    def experts_split(self) -> int:
        return self.tp if self.expert_tp is None else self.expert_tp

    @property
    def experts_partition(self) -> int:
        return self.replica_size // self.experts_split

    def validate(self, world_size: int) -> "Layout":
        for name in ("tp", "ep", "dp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be at least 1, got {getattr(self, name)}")
        if self.tp * self.ep * self.dp != world_size:
            raise LayoutError(f"parallel.tp ({self.tp}) x parallel.ep ({self.ep}) x parallel.dp ({self.dp}) "
                              f"= {self.tp * self.ep * self.dp}, but the world has {world_size} ranks")
        if self.experts_split < 1 or self.replica_size % self.experts_split:
            raise LayoutError(f"parallel.expert_tp ({self.experts_split}) must divide tp x ep "
                              f"({self.replica_size})")
        if self.attention_dp and (self.tp != 1 or self.expert_tp not in (None, 1)):
            raise LayoutError(f"parallel.attention_dp runs attention whole on every rank: it needs "
                              f"parallel.tp=1 (got {self.tp}) and whole experts (parallel.expert_tp "
                              f"unset or 1, got {self.expert_tp}); use parallel.ep for the experts")
        return self

    @property
    def schedulers(self) -> int:
        """Ranks that schedule requests of their own: one per replica, or every rank (attention_dp)."""
        return self.dp * (self.replica_size if self.attention_dp else 1)


@dataclasses.dataclass
class Group:
    """One communicator as seen from this rank (group None: a group of one, every collective a no-op).
    peer: its one-shot all-reduce through GPU peer memory, where on (parallel/peer_memory.py)."""
    group: object
    rank: int
    size: int
    ranks: tuple[int, ...]
    peer: peer_memory.PeerAllReduce | None = None

    @property
    def first(self) -> int:
        return self.ranks[0]


@dataclasses.dataclass
class Parallel:
    rank: int
    world_size: int
    layout: Layout
    device: torch.device
    tp: Group
    experts_split: Group  # ranks sharing experts, each holding a slice of every expert's intermediate dim
    experts_partition: Group  # ranks holding different experts (the all-to-all group)
    replica: Group
    dp_rank: int
    replica_host: Group | None = None  # the replica over gloo, for host-side messages (the step plans)
    peer_memory_tried: bool = False  # use_peer_memory ran (its groups' `peer` say what it set up)

    @property
    def is_writer(self) -> bool:
        """A rank that schedules, samples and writes results: the replica's first (its other ranks
        follow its step plans), or every rank under attention_dp."""
        return self.replica.rank == 0 or self.layout.attention_dp

    @property
    def tokens_shared(self) -> bool:
        """Every rank of the replica holds the same tokens (attention replicated or split over tp);
        under attention_dp each rank's tokens are its own."""
        return not self.layout.attention_dp

    @property
    def shares_plans(self) -> bool:
        """The replica's ranks run the first rank's step plans (tensor or expert parallelism over one
        set of requests)."""
        return self.replica.size > 1 and self.tokens_shared

    @property
    def steps_together(self) -> bool:
        """attention_dp with more than one rank: each plans its own steps, and all agree before each
        step on whether any has one and which kind it is (the engine's lockstep)."""
        return self.replica.size > 1 and self.layout.attention_dp

    @property
    def gpus_per_scheduler(self) -> int:
        """GPUs whose time one scheduler's requests take: its replica's, or under attention_dp its own
        (its experts serve the other ranks' tokens as theirs serve its)."""
        return 1 if self.layout.attention_dp else self.replica.size

    @property
    def scheduler_index(self) -> int:
        """This writer's place among the layout's `schedulers` (which requests it takes)."""
        return self.dp_rank * self.replica.size + self.replica.rank if self.layout.attention_dp \
            else self.dp_rank


def _single_group() -> Group:
    return Group(None, 0, 1, (0,))


def single(device: torch.device | str = "cpu") -> Parallel:
    """World size 1: every group is this process alone."""
    return Parallel(0, 1, Layout(), torch.device(device), _single_group(), _single_group(), _single_group(),
                    _single_group(), 0, _single_group())


def _make_group(ranks: list[int], me: int, cache: dict, timeout: datetime.timedelta,
                backend: str | None) -> Group:
    key = (tuple(ranks), backend)
    if key not in cache:
        # Sub-groups do not inherit the world's timeout; without one they wait 30 minutes.
        cache[key] = dist.new_group(list(ranks), timeout=timeout, backend=backend) if len(ranks) > 1 else None
    return Group(cache[key], ranks.index(me), len(ranks), tuple(ranks)) if me in ranks else None


def _groups(world: int, layout: Layout, me: int, timeout: datetime.timedelta):
    """Every group of the layout, created on every rank in the same order (new_group requires it)."""
    cache: dict = {}
    mine = {}
    size = layout.replica_size
    for replica in range(layout.dp):
        base = replica * size
        members = list(range(base, base + size))
        candidates = {
            "replica": [members],
            "replica_host": [members],
            "tp": [members[i:i + layout.tp] for i in range(0, size, layout.tp)],
            "experts_split": [members[i:i + layout.experts_split]
                              for i in range(0, size, layout.experts_split)],
            "experts_partition": [members[j::layout.experts_split] for j in range(layout.experts_split)],
        }
        for kind, groups in candidates.items():
            backend = "gloo" if kind == "replica_host" else None  # None: the world's (NCCL on GPUs)
            for ranks in groups:
                g = _make_group(ranks, me, cache, timeout, backend)
                if g is not None:
                    mine[kind] = g
    return mine


def init(layout: Layout, *, rank: int | None = None, world_size: int | None = None,
         master_addr: str | None = None, master_port: int | None = None, device_type: str = "auto",
         timeout_s: float = 600.0) -> Parallel:
    """Join (or skip, at world size 1) the process group and build this rank's sub-groups.

    rank/world_size/master_* default to torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK). A collective that waits longer than `timeout_s` raises instead of
    hanging, so a dead or stuck rank ends the job.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    layout.validate(world_size)
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    device = torch.device(f"cuda:{local_rank}") if device_type == "cuda" else torch.device("cpu")
    if world_size == 1:
        return single(device)
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    g = _groups(world_size, layout, rank, timeout)
    heartbeat.start(rank, world_size)
    return Parallel(rank, world_size, layout, device, g["tp"], g["experts_split"], g["experts_partition"],
                    g["replica"], rank // layout.replica_size, g["replica_host"])


def use_peer_memory(parallel: Parallel) -> None:
    """Give the groups that all-reduce activations (attention's partial sums over tp, the experts'
    over experts_split or, with experts partitioned over shared tokens, over the replica) a
    peer-memory all-reduce (parallel/peer_memory.py), one per communicator (these are often the same
    ranks). Every rank of the job calls this together, once: each walks the same groups in the same
    order, so each group's ranks set it up together. Later calls (another LLM in the same job) keep
    what the first made. Under attention_dp the replica exchanges rows all-to-all and all-reduces
    nothing, so it gets none."""
    if parallel.peer_memory_tried:
        return
    parallel.peer_memory_tried = True
    made: dict[int, peer_memory.PeerAllReduce | None] = {}
    groups = (parallel.tp, parallel.experts_split) + ((parallel.replica,) if parallel.tokens_shared else ())
    for g in groups:
        if g.size > 1:
            if id(g.group) not in made:
                made[id(g.group)] = peer_memory.for_group(g.group, parallel.device)
            g.peer = made[id(g.group)]


def shutdown() -> None:
    """Leave the process group once every rank is done with it: a rank that exits while another
    still finishes a collective with it can abort in gloo's teardown."""
    if dist.is_initialized():
        dist.barrier()
        heartbeat.stop()  # no thread in the store's C++ calls while the group goes
        dist.destroy_process_group()
