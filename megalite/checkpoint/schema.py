"""The checkpoint contract: what each rank's file holds, as typed values written and read in one place.

    RankState
      model     state_dict name -> tensor: this rank's tp shard of its pipeline stage's weights
      shards    name -> {"partition_dim", "full_shape", "tp_size"[, "valid_rows"]}: how the shards of
                every tp rank join into full tensors (tensor_parallel.shard_metadata)
      engine    the engine's own state: the native engine's {"optimizer", "schedule", "scaler",
                "precision"}, or DeepSpeed's {"backend": "deepspeed", "zero_stage", "params" (ZeRO
                slices), ...} (engine/deepspeed.py, DeepSpeedEngine.state_dict)
      rng       python / numpy / torch (/ cuda) generator states and the tp tracker's ("tp_tracker")
      progress  Progress: step, consumed samples, and the settings that decide the data order
      layout    Layout: the grid (tp, pp, world size, virtual stages, rank order) and the partition

The Trainer writes it (one per rank, io.save_checkpoint); the converters that write checkpoints
offline (HF import, reshard: checkpoint.layout) write the same; resume reads it back with
`RankState.from_dict`, and every other reader (consolidation, resharding, HF export, generation:
checkpoint.reader) reads its skeleton through the same `Layout`. Checkpoints written before a key
existed get its old default here, and nowhere else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from megalite.checkpoint.io import CheckpointError
from megalite.topology import Coords, Topology

STATE_KEYS = ("model", "shards", "engine", "rng", "progress", "layout")


@dataclass(frozen=True)
class Layout:
    """How the ranks that wrote a checkpoint were laid out: which rank holds which shard of which block."""

    tp: int
    pp: int
    world_size: int
    virtual_stages: int = 1
    order: str = "tp-dp-pp"     # recorded since rank orders existed; the only order before
    partition: str = "uniform"  # recorded since balanced partitions existed
    cp: int = 1                 # recorded since context parallelism existed; 1 before
    ep: int = 1                 # recorded since expert parallelism existed; 1 before

    def __post_init__(self):
        try:
            self.topology
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint layout {self.to_dict()} is not a valid grid: {e}") from None

    @classmethod
    def from_dict(cls, data, where) -> "Layout":
        """The layout a rank's state records; CheckpointError naming `where` when it is unreadable."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"tp", "pp", "world_size"} <= set(data) or set(data) - known:
            raise CheckpointError(f"{where}: unknown layout metadata {data!r}; expected the keys {sorted(known)} "
                                  "as megalite writes them")
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("cp", "ep"):  # 1: what layouts from before that dimension wrote, so they compare equal
            if out[key] == 1:
                del out[key]
        return out

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def topology(self) -> Topology:
        return Topology.from_world(self.world_size, tp=self.tp, pp=self.pp, virtual_stages=self.virtual_stages,
                                   order=self.order, cp=self.cp, ep=self.ep)

    def coords(self, rank: int) -> Coords:
        """(tp, pp, dp, cp) of a rank of this layout."""
        return self.topology.coords(rank)

    def describe(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return (f"tp={self.tp}{cp} pp={self.pp} dp={self.dp} virtual_stages={self.virtual_stages} "
                f"order={self.order} partition={self.partition}")


@dataclass(frozen=True)
class Progress:
    """Where training stood: steps taken, samples consumed, and the settings that decide the sample order."""

    step: int = 0
    consumed_samples: int = 0
    data_order: dict | None = None  # None: not recorded (imported weights, older checkpoints)
    skipped_samples: list = field(default_factory=list)  # [[start, end), ...] of the training order (stability)

    @classmethod
    def from_dict(cls, data, where) -> "Progress":
        if not isinstance(data, dict) or "step" not in data:
            raise CheckpointError(f"{where}: progress {data!r} has no step")
        skipped = data.get("skipped_samples") or []
        if not all(isinstance(r, list) and len(r) == 2 for r in skipped):
            raise CheckpointError(f"{where}: progress skipped_samples {skipped!r} is not a list of [start, end]")
        return cls(int(data["step"]), int(data.get("consumed_samples", 0)), data.get("data_order"),
                   [[int(a), int(b)] for a, b in skipped])

    def to_dict(self) -> dict:
        out = {"step": self.step, "consumed_samples": self.consumed_samples}
        if self.skipped_samples:  # only where a run skipped data: older readers see what they wrote
            out["skipped_samples"] = [list(r) for r in self.skipped_samples]
        return out if self.data_order is None else {**out, "data_order": dict(self.data_order)}


@dataclass
class RankState:
    """One rank's whole checkpoint state (see the module docstring for each field)."""

    model: dict
    shards: dict
    engine: dict
    rng: dict
    progress: Progress = field(default_factory=Progress)
    layout: Layout | None = None

    def to_dict(self) -> dict:
        """The nested dict io.save_checkpoint flattens (tensors to safetensors, the rest to JSON)."""
        return {"model": self.model, "shards": self.shards, "engine": self.engine, "rng": self.rng,
                "progress": self.progress.to_dict(), "layout": self.layout.to_dict()}

    @classmethod
    def from_dict(cls, state, where) -> "RankState":
        """A state (or skeleton) read back; CheckpointError naming `where` and what is missing."""
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{where}: the rank state lacks {missing}; it was not written by megalite's "
                                  "Trainer or converters (or by an older megalite)")
        return cls(state["model"], state["shards"], state["engine"], state["rng"],
                   Progress.from_dict(state["progress"], where), Layout.from_dict(state["layout"], where))


def engine_kind(engine: dict) -> str:
    """'deepspeed' or 'native': which engine wrote an engine state."""
    return "deepspeed" if isinstance(engine, dict) and engine.get("backend") == "deepspeed" else "native"
