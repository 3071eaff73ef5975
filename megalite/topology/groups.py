"""ProcessGroups: the communicators of one run, built once and handed around.

Instead of Megatron's module-level `parallel_state` globals, a single object
holds this rank's tensor, pipeline, data, model-parallel and embedding groups.
Whoever needs a group gets it from this object (a layer gets the one group it
uses), so two topologies can never be mixed by accident and tests can build as
many as they like. The same object answers DeepSpeed's / Megatron's `mpu`
getters, so it can be passed as `mpu=` unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megalite.topology.grid import GROUP_KINDS as _KINDS
from megalite.topology.grid import Coords, Topology


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's view of the grid and its communicators.

    Groups are torch.distributed ProcessGroup handles; they are None only in the
    single-process object (`single()`), where every size is 1 and every
    collective is skipped by the callers (they check the size first).
    """

    topology: Topology
    rank: int
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None
    embedding_group: object = None
    cp_group: object = None
    dp_cp_group: object = None
    ep_group: object = None
    edp_group: object = None
    _members: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, topology: Topology, backend: str | None = None) -> "ProcessGroups":
        """Create every group of `topology` (collective: all ranks must call it together).

        torch.distributed must be initialised with world size == topology.world_size.
        Each rank creates every group in the same order (dist.new_group is
        collective over the whole world) and keeps the ones that contain it;
        identical rank lists (e.g. tp and mp when pp == 1) share one communicator.
        `backend` None uses the default group's backend (nccl when init_distributed
        saw CUDA, else gloo), so a gloo world never gets NCCL subgroups.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroups.build needs torch.distributed initialised; call "
                               "megalite.topology.init_distributed first, or use ProcessGroups.single()")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != topology.world_size:
            raise ValueError(f"torch.distributed world size {world} != topology world size "
                             f"{topology.world_size} ({topology}); fix tp/pp/dp or the launch")
        made: dict[tuple[int, ...], object] = {}
        mine, members = {}, {}
        for kind in _KINDS:
            for ranks in topology.groups(kind):
                if ranks not in made:
                    made[ranks] = dist.new_group(list(ranks), backend=backend)
                if rank in ranks:
                    mine[kind], members[kind] = made[ranks], ranks
        return cls(topology, rank, mine["tp"], mine["pp"], mine["dp"], mine["mp"], mine["embedding"],
                   mine["cp"], mine["dp_cp"], mine["ep"], mine["edp"], _members=members)

    @classmethod
    def single(cls) -> "ProcessGroups":
        """One process, no torch.distributed: all groups None, all sizes 1, all ranks 0."""
        return cls(Topology(), 0, _members={kind: (0,) for kind in _KINDS})

    # --- coordinates -------------------------------------------------------------
    @property
    def coords(self) -> Coords:
        """(tp, pp, dp, cp) coordinates of this rank."""
        return self.topology.coords(self.rank)

    def members(self, kind: str) -> tuple[int, ...]:
        """Global ranks in this rank's group of `kind` (one of GROUP_KINDS)."""
        if kind not in self._members:
            raise ValueError(f"group kind {kind!r} is unknown; use one of {_KINDS}")
        return self._members[kind]

    @property
    def tp_size(self) -> int:
        """Tensor-parallel degree."""
        return self.topology.tp

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tp group."""
        return self.coords.tp

    @property
    def cp_size(self) -> int:
        """Context-parallel degree (ranks sharing one sequence)."""
        return self.topology.cp

    @property
    def cp_rank(self) -> int:
        """This rank's index in its cp group: which load-balanced chunks of the sequence it holds."""
        return self.coords.cp

    @property
    def grad_group(self):
        """The ranks this rank's parameter gradients are averaged over: dp x cp (cp ranks hold the
        same parameters and their losses are means over equal shares of the tokens)."""
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    @property
    def grad_size(self) -> int:
        """dp * cp: the size of grad_group."""
        return self.dp_size * self.cp_size

    @property
    def grad_rank(self) -> int:
        """This rank's index in grad_group (ranks sorted, as dist.get_rank(grad_group) numbers them)."""
        return self.members("dp_cp").index(self.rank) if self.cp_size > 1 else self.dp_rank

    @property
    def ep_size(self) -> int:
        """Expert-parallel degree (ranks sharing one MoE layer's experts between them)."""
        return self.topology.ep

    @property
    def ep_rank(self) -> int:
        """This rank's index in its ep group: which share of the experts it holds."""
        return self.members("ep").index(self.rank)

    @property
    def pp_size(self) -> int:
        """Pipeline stages."""
        return self.topology.pp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.coords.pp

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas."""
        return self.topology.dp

    @property
    def dp_rank(self) -> int:
        """This rank's replica index."""
        return self.coords.dp

    @property
    def mp_size(self) -> int:
        """Ranks per model replica: tp * pp."""
        return self.topology.tp * self.topology.pp

    @property
    def mp_rank(self) -> int:
        """Position in the mp group, ranks sorted: what dist.get_rank(mp_group) returns
        (pp_rank * tp_size + tp_rank with the default order)."""
        return self.members("mp").index(self.rank)

    @property
    def is_first_stage(self) -> bool:
        """Holds the embedding (pipeline stage 0)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Holds the output head and loss."""
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline stage; the first stage wraps to the last
        (interleaved schedules pass chunk boundaries around the ring)."""
        c = self.coords
        return self.topology.rank(tp=c.tp, pp=(c.pp - 1) % self.pp_size, dp=c.dp, cp=c.cp)

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline stage; the last stage wraps to the first."""
        c = self.coords
        return self.topology.rank(tp=c.tp, pp=(c.pp + 1) % self.pp_size, dp=c.dp, cp=c.cp)

    # --- DeepSpeed / Megatron `mpu` interface -----------------------------------
    # DeepSpeed reduces gradients and shards ZeRO state over its "data-parallel" group: dp x cp
    # (Megatron hands DeepSpeed the same group with context parallelism).
    def get_data_parallel_group(self):
        """mpu: the gradient group (dp, times cp under context parallelism)."""
        return self.grad_group

    def get_data_parallel_world_size(self) -> int:
        """mpu: dp * cp."""
        return self.grad_size

    def get_data_parallel_rank(self) -> int:
        """mpu: index in the gradient group."""
        return self.grad_rank

    def get_model_parallel_group(self):
        """tp x pp: the ranks that together hold one model replica."""
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        """mpu: tp * pp."""
        return self.mp_size

    def get_model_parallel_rank(self) -> int:
        """mpu: index in the mp group."""
        return self.mp_rank

    def get_tensor_model_parallel_group(self):
        """mpu: the tp group."""
        return self.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        """mpu: tp degree."""
        return self.tp_size

    def get_tensor_model_parallel_rank(self) -> int:
        """mpu: index in the tp group."""
        return self.tp_rank

    def get_pipeline_model_parallel_group(self):
        """mpu: the pp group."""
        return self.pp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        """mpu: pp degree."""
        return self.pp_size

    def get_pipeline_model_parallel_rank(self) -> int:
        """mpu: pipeline stage."""
        return self.pp_rank
