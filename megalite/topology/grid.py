"""The rank grid as pure math: coordinates, ranks and group membership.

A run with world size W = tp * cp * pp * dp lays its ranks out on a 4-D grid.
The `order` string lists the dimensions fastest-varying first: with
"tp-cp-dp-pp" (Megatron's default) the tp ranks of one layer are adjacent (same
node, fast links), then the context-parallel ranks that share one sequence,
then data-parallel replicas, then pipeline stages:

    rank = tp + tp_size * (cp + cp_size * (dp + dp_size * pp))

An order of three dimensions (the layouts before context parallelism,
"tp-dp-pp") places cp right after tp, so with cp = 1 every rank keeps its place.
Context-parallel ranks hold the same parameters and read the same samples (each
its chunks of the sequence); for parameter gradients they are replicas like dp,
hence the 'dp_cp' group the gradients are reduced over.

Expert parallelism is not a dimension of its own: each dp_cp group (its ranks in increasing order)
is cut into consecutive blocks of `ep` ranks, the 'ep' groups, which shard an MoE layer's experts
between them; the ranks at the same place of every block of a dp_cp group form an 'edp' group,
which holds the same experts (their gradients are averaged over it).

Nothing here touches torch.distributed, so every layout can be tested
exhaustively without processes; `groups.ProcessGroups` turns these rank lists
into communicators.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from megalite.config import choices

DIMS = ("tp", "cp", "pp", "dp")
GROUP_KINDS = ("tp", "cp", "pp", "dp", "dp_cp", "mp", "embedding", "ep", "edp")
ORDERS = choices("parallel.order")  # every permutation of tp, cp, dp, pp (or of tp, dp, pp: cp after tp)
# Which coordinates vary within a group of each kind (the others are fixed).
_VARYING = {"tp": ("tp",), "cp": ("cp",), "pp": ("pp",), "dp": ("dp",), "dp_cp": ("cp", "dp"),
            "mp": ("tp", "pp")}


class Coords(NamedTuple):
    """A rank's position on the grid (cp last, so three-field code keeps reading tp, pp, dp)."""

    tp: int
    pp: int
    dp: int
    cp: int = 0


def parse_order(order: str) -> tuple[str, str, str, str]:
    """'tp-cp-dp-pp' -> ('tp', 'cp', 'dp', 'pp'); 'tp-dp-pp' -> the same (cp right after tp). Errors
    unless it lists tp, dp, pp (and optionally cp) once each."""
    parts = tuple(p.strip() for p in str(order).split("-"))
    if "cp" not in parts and "tp" in parts:
        at = parts.index("tp") + 1
        parts = parts[:at] + ("cp",) + parts[at:]
    if sorted(parts) != sorted(DIMS):
        raise ValueError(f"order={order!r} must list tp, cp, dp and pp once each (cp may be left out: it "
                         f"follows tp), fastest-varying first, e.g. 'tp-cp-dp-pp' or 'tp-dp-pp'")
    return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class Topology:
    """Degrees of tensor, context, pipeline and data parallelism and the rank order.

    Frozen and validated on creation: a Topology that exists is consistent.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_stages: int = 1
    order: str = "tp-dp-pp"
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "virtual_stages", "cp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology {name}={value!r} must be a positive integer")
        parse_order(self.order)
        if (self.dp * self.cp) % self.ep:
            raise ValueError(f"Topology ep={self.ep} must divide dp * cp = {self.dp}*{self.cp} (expert-parallel "
                             "groups are carved from the data- and context-parallel ranks)")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError(f"Topology virtual_stages={self.virtual_stages} needs pp > 1 "
                             "(interleaving splits each pipeline rank's layers into chunks); set pp or "
                             "virtual_stages=1")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, dp: int | None = None,
                   virtual_stages: int = 1, order: str = "tp-dp-pp", cp: int = 1, ep: int = 1) -> "Topology":
        """The topology for `world_size` ranks; dp=None infers world_size / (tp * cp * pp)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be a positive integer")
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        split = tp * cp * pp
        if world_size % split:
            raise ValueError(f"world_size={world_size} is not divisible by tp*cp*pp={tp}*{cp}*{pp}={split}; "
                             f"launch a multiple of {split} ranks or change tp/cp/pp")
        inferred = world_size // split
        if dp is not None and dp != inferred:
            raise ValueError(f"dp={dp} does not match world_size={world_size} / (tp*cp*pp={split}) = {inferred}; "
                             f"set dp={inferred} or leave it unset")
        return cls(tp=tp, pp=pp, dp=inferred, virtual_stages=virtual_stages, order=order, cp=cp, ep=ep)

    @property
    def world_size(self) -> int:
        """Total ranks: tp * cp * pp * dp."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def _dims(self) -> tuple[str, str, str, str]:
        return parse_order(self.order)

    def size(self, dim: str) -> int:
        """Degree of one grid dimension ('tp', 'cp', 'pp' or 'dp')."""
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

    def rank(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """Global rank at grid coordinates (tp, pp, dp, cp)."""
        given = {"tp": tp, "pp": pp, "dp": dp, "cp": cp}
        for dim, value in given.items():
            if not 0 <= value < self.size(dim):
                raise ValueError(f"{dim}={value} is outside 0..{self.size(dim) - 1} for {self}")
        rank = 0
        for dim in reversed(self._dims):  # Horner's rule, slowest-varying first
            rank = rank * self.size(dim) + given[dim]
        return rank

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """All groups of one kind, each a sorted tuple of global ranks; together they partition the ranks.

        'tp', 'cp', 'pp', 'dp': ranks differing only in that coordinate. 'dp_cp': the
        ranks differing in dp or cp, which hold the same parameters (gradients are
        reduced over them). 'ep' / 'edp': see the module docstring (expert parallelism; each rank
        its own group of one when ep = 1 / the dp_cp group). 'mp': the tp x pp ranks holding one full model replica
        (same dp and cp coordinates). 'embedding': the
        first and last stage of each pipeline (they share tied embedding gradients);
        a single rank when pp == 1, and middle stages as groups of one so that every
        rank has an embedding group and a collective in it is a harmless no-op.
        """
        return list(self._groups(kind))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - Topology is frozen and small; callers ask again and again
    def _groups(self, kind: str) -> tuple[tuple[int, ...], ...]:
        if kind == "ep":  # consecutive blocks of ep ranks of each dp_cp group
            return tuple(sorted(g[i:i + self.ep] for g in self._groups("dp_cp") for i in range(0, len(g), self.ep)))
        if kind == "edp":  # the same place in every block of a dp_cp group
            return tuple(sorted(g[j::self.ep] for g in self._groups("dp_cp") for j in range(self.ep)))
        if kind == "embedding":
            out = []
            for g in self.groups("pp"):
                out.append((g[0], g[-1]) if len(g) > 1 else g)
                out.extend((r,) for r in g[1:-1])
            return tuple(sorted(out))
        varying = _VARYING.get(kind)
        if varying is None:
            raise ValueError(f"group kind {kind!r} is unknown; use one of {GROUP_KINDS}")
        by_key: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)._asdict()
            key = tuple(c[d] for d in DIMS if d not in varying)
            by_key.setdefault(key, []).append(r)
        return tuple(sorted(tuple(g) for g in by_key.values()))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - as groups
    def _group_index(self, kind: str) -> dict[int, tuple[int, ...]]:
        return {r: g for g in self._groups(kind) for r in g}

    def group_of(self, rank: int, kind: str) -> tuple[int, ...]:
        """The group of `kind` that contains `rank`."""
        self._check_rank(rank)
        return self._group_index(kind)[rank]

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is outside 0..{self.world_size - 1} for {self}")
