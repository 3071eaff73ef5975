"""The rank grid as pure math: coordinates, ranks and group membership.

A run with world size W = tp * pp * dp lays its ranks out on a 3-D grid. The
`order` string lists the dimensions fastest-varying first: with "tp-dp-pp"
(Megatron's default) the tp ranks of one layer are adjacent (same node, fast
links), then data-parallel replicas, then pipeline stages:

    rank = tp + tp_size * (dp + dp_size * pp)

Nothing here touches torch.distributed, so every layout can be tested
exhaustively without processes; `groups.ProcessGroups` turns these rank lists
into communicators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from megalite.config import choices

DIMS = ("tp", "pp", "dp")
GROUP_KINDS = ("tp", "pp", "dp", "mp", "embedding")
ORDERS = choices("parallel.order")  # every permutation of tp, dp, pp


class Coords(NamedTuple):
    """A rank's position on the grid."""

    tp: int
    pp: int
    dp: int


def parse_order(order: str) -> tuple[str, str, str]:
    """'tp-dp-pp' -> ('tp', 'dp', 'pp'); errors unless it is a permutation of tp, dp, pp."""
    parts = tuple(p.strip() for p in str(order).split("-"))
    if sorted(parts) != sorted(DIMS):
        raise ValueError(f"order={order!r} must list tp, dp and pp once each, fastest-varying first, "
                         f"e.g. 'tp-dp-pp' (one of {', '.join(ORDERS)})")
    return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class Topology:
    """Degrees of tensor, pipeline and data parallelism and the rank order.

    Frozen and validated on creation: a Topology that exists is consistent.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_stages: int = 1
    order: str = "tp-dp-pp"

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology {name}={value!r} must be a positive integer")
        parse_order(self.order)
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError(f"Topology virtual_stages={self.virtual_stages} needs pp > 1 "
                             "(interleaving splits each pipeline rank's layers into chunks); set pp or "
                             "virtual_stages=1")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None,
                   virtual_stages: int = 1, order: str = "tp-dp-pp") -> "Topology":
        """The topology for `world_size` ranks; dp=None infers world_size / (tp * pp)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be a positive integer")
        for name, value in (("tp", tp), ("pp", pp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if world_size % (tp * pp):
            raise ValueError(f"world_size={world_size} is not divisible by tp*pp={tp}*{pp}={tp * pp}; "
                             f"launch a multiple of {tp * pp} ranks or change tp/pp")
        inferred = world_size // (tp * pp)
        if dp is not None and dp != inferred:
            raise ValueError(f"dp={dp} does not match world_size={world_size} / (tp*pp={tp * pp}) = {inferred}; "
                             f"set dp={inferred} or leave it unset")
        return cls(tp=tp, pp=pp, dp=inferred, virtual_stages=virtual_stages, order=order)

    @property
    def world_size(self) -> int:
        """Total ranks: tp * pp * dp."""
        return self.tp * self.pp * self.dp

    @property
    def _dims(self) -> tuple[str, str, str]:
        return parse_order(self.order)

    def size(self, dim: str) -> int:
        """Degree of one grid dimension ('tp', 'pp' or 'dp')."""
        if dim not in DIMS:
            raise ValueError(f"dim={dim!r} is not a grid dimension; use one of {DIMS}")
        return getattr(self, dim)

    def coords(self, rank: int) -> Coords:
        """Grid coordinates of a global rank."""
        self._check_rank(rank)
        out = {}
        for dim in self._dims:  # mixed-radix digits, fastest-varying first
            out[dim] = rank % self.size(dim)
            rank //= self.size(dim)
        return Coords(**out)

    def rank(self, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        """Global rank at grid coordinates (tp, pp, dp)."""
        given = {"tp": tp, "pp": pp, "dp": dp}
        for dim, value in given.items():
            if not 0 <= value < self.size(dim):
                raise ValueError(f"{dim}={value} is outside 0..{self.size(dim) - 1} for {self}")
        rank = 0
        for dim in reversed(self._dims):  # Horner's rule, slowest-varying first
            rank = rank * self.size(dim) + given[dim]
        return rank

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """All groups of one kind, each a sorted tuple of global ranks; together they partition the ranks.

        'tp', 'pp', 'dp': ranks differing only in that coordinate. 'mp': the tp x pp
        ranks holding one full model replica (same dp coordinate). 'embedding': the
        first and last stage of each pipeline (they share tied embedding gradients);
        a single rank when pp == 1, and middle stages as groups of one so that every
        rank has an embedding group and a collective in it is a harmless no-op.
        """
        if kind == "embedding":
            out = []
            for g in self.groups("pp"):
                out.append((g[0], g[-1]) if len(g) > 1 else g)
                out.extend((r,) for r in g[1:-1])
            return sorted(out)
        varying = {"tp": ("tp",), "pp": ("pp",), "dp": ("dp",), "mp": ("tp", "pp")}.get(kind)
        if varying is None:
            raise ValueError(f"group kind {kind!r} is unknown; use one of {GROUP_KINDS}")
        by_key: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)._asdict()
            key = tuple(c[d] for d in DIMS if d not in varying)
            by_key.setdefault(key, []).append(r)
        return sorted(tuple(g) for g in by_key.values())

    def group_of(self, rank: int, kind: str) -> tuple[int, ...]:
        """The group of `kind` that contains `rank`."""
        self._check_rank(rank)
        return next(g for g in self.groups(kind) if rank in g)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is outside 0..{self.world_size - 1} for {self}")
