"""The one reader of whole checkpoints: any layout, one full tensor at a time, without the cluster.

`CheckpointReader` opens a step directory written at any (tp, pp, dp), by the native engine or
DeepSpeed ZeRO 0-3: it verifies the manifest (every file's size, every rank's sha256, hashed in
1 MiB chunks), reads every rank's JSON skeleton (the checkpoint.schema contract, whose Layout
says which rank holds which coordinates), and indexes where each tensor's pieces live.
`read(name)` then fetches only that tensor's pieces from the rank files (safetensors `safe_open`,
so nothing else is loaded): the tp shards of the pipeline stage that holds it, each shard joined
from the ZeRO slices of every dp rank of its (pp, tp) cell when the checkpoint is ZeRO-partitioned
(engine state "params": start, numel, shape, fp32 master), else taken from the saved model
weights. Replicated tensors are checked equal across tp ranks. `optimizer_state(name, ...)` does
the same for a native-engine checkpoint's AdamW moments, and `load(rank, key)` gives any other
part of a rank's state.

Consolidation (checkpoint.consolidate), resharding, the Hugging Face export and generation all
read through it. Peak memory of a read: one full tensor, plus, for ZeRO checkpoints, that
tensor's local flat buffer and one dp slice; pages of the memory-mapped rank files are the page
cache's, not the process's.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Callable, Iterator, Mapping

import torch

from megalite.checkpoint.io import MANIFEST, CheckpointError, rank_files, read_json, step_directory, verify
from megalite.checkpoint.schema import Layout, engine_kind
from megalite.checkpoint.state import unflatten

_OPEN_FILES = 64  # rank files kept open at once (a checkpoint of thousands of ranks must not exhaust fds)


def _key(node, where: str) -> str:
    """The safetensors key a skeleton node refers to."""
    if not isinstance(node, dict) or "__tensor__" not in node:
        raise CheckpointError(f"{where} is not a tensor reference in the rank's skeleton")
    return node["__tensor__"]


class _RankTensors:
    """The mapping `unflatten` reads a rank's tensors from: each one loaded when asked for."""

    def __init__(self, reader: "CheckpointReader", rank: int):
        self.reader, self.rank = reader, rank

    def __contains__(self, key: str) -> bool:
        return True  # a missing key is named by _get

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reader._get(self.rank, key)


class CheckpointReader:
    """Full tensors of a megalite checkpoint (root or step directory), read one at a time on demand."""

    def __init__(self, checkpoint):
        self.dir = d = step_directory(checkpoint)
        manifest = read_json(d / MANIFEST, "the checkpoint manifest")
        world = manifest.get("world_size")
        if not isinstance(world, int) or world < 1:
            raise CheckpointError(f"{d / MANIFEST} has no valid world_size; not a megalite checkpoint")
        self.step = int(manifest.get("step", 0))
        self.skeletons = []
        for rank in range(world):
            verify(d, manifest, rank)  # sizes of all files, sha256 of this rank's: a corrupt file is named
            doc = read_json(d / rank_files(rank)[1], "this rank's non-tensor state")
            self.skeletons.append(doc.get("skeleton") or {})
        self.layout = Layout.from_dict(self.skeletons[0].get("layout"), f"{d} (rank 0)")
        for rank, skeleton in enumerate(self.skeletons):
            if skeleton.get("layout") != self.skeletons[0].get("layout"):
                raise CheckpointError(f"{d}: rank {rank}'s layout {skeleton.get('layout')} differs from rank 0's "
                                      f"{self.skeletons[0].get('layout')}; is a rank's file from another checkpoint?")
        if self.layout.world_size != world:
            raise CheckpointError(f"{d}: rank 0's layout says world_size={self.layout.world_size} but the manifest "
                                  f"lists {world} ranks")
        self.engine_kind = engine_kind(self.skeletons[0].get("engine"))
        self._handles: OrderedDict = OrderedDict()
        self._index()

    def _index(self) -> None:
        """cells (pp, tp) -> their ranks in increasing order (the dp, or dp x cp, replicas: the order of
        ZeRO's group ranks); per stage its shard metadata; which stage owns each name."""
        cells: dict[tuple[int, int], list[int]] = defaultdict(list)
        for rank in range(len(self.skeletons)):
            c = self.layout.coords(rank)
            cells[(c.pp, c.tp)].append(rank)
        self.cells = dict(cells)
        self.pp, self.tp = self.layout.pp, self.layout.tp
        self.meta, self.owner, self.zero = {}, {}, {}
        for pp in range(self.pp):
            meta = self.skeletons[self.cells[(pp, 0)][0]].get("shards")
            if not meta:
                raise CheckpointError(f"{self.dir} (pipeline stage {pp}) has no shard metadata ('shards'); it was "
                                      "written by an older megalite")
            self.meta[pp] = meta
            for name in meta:
                self.owner.setdefault(name, pp)
            for tp in range(self.tp):
                self.zero[(pp, tp)] = self._zero_index(self.cells[(pp, tp)])

    def _zero_index(self, ranks: list[int]) -> dict[str, list[tuple[int, dict]]]:
        """name -> [(rank, ZeRO slice entry)] over a cell's dp ranks; aliases map to their parameter's list."""
        engine = self.skeletons[ranks[0]].get("engine") or {}
        if engine_kind(engine) != "deepspeed" or "params" not in engine:
            return {}  # native engine or ZeRO-0: the model weights are whole on every rank
        out: dict[str, list] = defaultdict(list)
        for rank in ranks:
            for name, entry in (self.skeletons[rank]["engine"].get("params") or {}).items():
                out[name].append((rank, entry))
        for alias, name in (engine.get("aliases") or {}).items():
            out[alias] = out[name]
        return dict(out)

    # ------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """Every tensor name, in stage order (state_dict order within a stage)."""
        return list(self.owner)

    def shape(self, name: str, strip_padding: bool = True) -> list[int]:
        """Full shape of `name` (vocabulary padding stripped unless asked not to); nothing is read."""
        entry = self._entry(name)
        shape = list(entry["full_shape"])
        if entry.get("expert_parallel"):  # each ep rank holds E / ep of the experts
            shape[0] *= self.layout.ep
        if strip_padding and "valid_rows" in entry:
            shape[0] = int(entry["valid_rows"])
        return shape

    def _entry(self, name: str) -> dict:
        if name not in self.owner:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint {self.dir}")
        return self.meta[self.owner[name]][name]

    def _get(self, rank: int, key: str) -> torch.Tensor:
        """Tensor `key` of rank `rank`'s file (only that tensor is read)."""
        from safetensors import safe_open

        path = self.dir / rank_files(rank)[0]
        if rank not in self._handles:
            if len(self._handles) >= _OPEN_FILES:
                self._handles.popitem(last=False)
            try:
                self._handles[rank] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for every malformed file
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        self._handles.move_to_end(rank)
        try:
            return self._handles[rank].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path} lacks tensor '{key}' that its skeleton names: {e}") from e

    def load(self, rank: int, key: str):
        """Part `key` of rank `rank`'s state ('engine', 'progress', ...), with its tensors read."""
        if key not in self.skeletons[rank]:
            raise CheckpointError(f"{self.dir}: rank {rank}'s state has no '{key}'")
        try:
            return unflatten(_RankTensors(self, rank), self.skeletons[rank][key])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.dir}: rank {rank}'s '{key}' does not fit its tensor file: {e}") from e

    def _across_experts(self, name: str, pp: int, tp: int, read: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """read(rank) of the (pp, tp) cell's first rank; for an MoE layer's experts under expert parallelism,
        of its first ep ranks (a cell's ranks in order: its first ep group), joined along the experts."""
        ranks = self.cells[(pp, tp)][: self.layout.ep if self._entry(name).get("expert_parallel") else 1]
        parts = [read(rank) for rank in ranks]
        return parts[0] if len(parts) == 1 or parts[0].dim() == 0 else torch.cat(parts, 0)

    def _local(self, pp: int, tp: int, name: str) -> torch.Tensor:
        """This (pp, tp) cell's whole local (tp-sharded) fp32 tensor `name`."""
        pieces = self.zero[(pp, tp)].get(name)
        if not pieces:
            def model_tensor(rank: int) -> torch.Tensor:
                node = (self.skeletons[rank].get("model") or {}).get(name)
                return self._get(rank, _key(node, f"rank {rank}'s model['{name}']")).float()
            return self._across_experts(name, pp, tp, model_tensor)
        ep = self.layout.ep if self._entry(name).get("expert_parallel") else 1
        if ep == 1:
            return self._assemble(pieces, pp, tp, name)
        # experts under ZeRO: each ep rank's share is sliced over its edp group (the cell's ranks at the
        # same place of every block of ep), assembled per ep rank, then joined along the experts
        cell = self.cells[(pp, tp)]
        return torch.cat([self._assemble([(r, e) for r, e in pieces if cell.index(r) % ep == j], pp, tp, name)
                          for j in range(ep)], 0)

    def _assemble(self, pieces: list[tuple[int, dict]], pp: int, tp: int, name: str) -> torch.Tensor:
        """A local tensor from its ZeRO slices [(rank, entry)], checked complete."""
        shape = [int(s) for s in pieces[0][1]["shape"]]
        flat, filled = torch.zeros(shape, dtype=torch.float32).reshape(-1), 0
        for rank, entry in pieces:  # one dp slice at a time
            start, numel = int(entry["start"]), int(entry["numel"])
            flat[start:start + numel] = self._get(rank, _key(entry.get("master"), f"rank {rank}'s master of "
                                                             f"'{name}'")).float().reshape(-1)
            filled += numel
        if filled != flat.numel():
            raise CheckpointError(f"{self.dir} (pp={pp}, tp={tp}): '{name}' has {filled} of {flat.numel()} elements "
                                  "across the dp ranks' ZeRO slices; is a rank's file missing or from another run?")
        return flat.view(shape)

    def _join(self, name: str, shard: Callable[[int], torch.Tensor], what: str, strip_padding: bool) -> torch.Tensor:
        """The full tensor from the tp shards `shard(tp)` of `name` (or of a per-element state of it);
        a replicated one is read once per tp rank, one at a time, and checked equal."""
        entry = self._entry(name)
        dim, want = entry["partition_dim"], self.shape(name, strip_padding=False)
        if dim is None:
            full = shard(0)
            for tp in range(1, self.tp):
                if not torch.equal(shard(tp), full):
                    raise CheckpointError(f"{self.dir}: {what} is replicated across tp ranks but tp rank {tp} "
                                          "differs from rank 0; the checkpoint's replicas diverged")
        else:
            full = torch.cat([shard(tp) for tp in range(self.tp)], dim=dim)
        if list(full.shape) != want:
            raise CheckpointError(f"{self.dir}: {what} assembles to shape {list(full.shape)} but its metadata "
                                  f"says {want}; the checkpoint is inconsistent")
        return full[: entry["valid_rows"]] if strip_padding and "valid_rows" in entry else full

    def read(self, name: str, strip_padding: bool = True) -> torch.Tensor:
        """The full fp32 tensor `name` (tp shards and ZeRO slices joined; vocabulary padding stripped)."""
        pp = self._stage(name)
        return self._join(name, lambda tp: self._local(pp, tp, name), f"'{name}'", strip_padding)

    def _stage(self, name: str) -> int:
        self._entry(name)
        return self.owner[name]

    def optimizer_state(self, name: str, index: Mapping[int, Mapping[str, int]]) -> dict | None:
        """Native-engine AdamW state of parameter `name`: per-element entries (exp_avg, ...) full and
        unpadded, scalars (the step) as saved; None before the first step.

        `index[pp][name]` is the parameter's position in stage pp's optimizer (its param groups'
        order, checkpoint.layout.optimizer_param_names); a tied alias maps to its parameter's.
        """
        if self.engine_kind != "native":
            raise CheckpointError(f"{self.dir} was written by the DeepSpeed engine; its optimizer state lives in "
                                  "ZeRO slices, not in the native engine's AdamW state")
        pp = self._stage(name)
        if name not in index[pp]:
            raise CheckpointError(f"{self.dir}: '{name}' is not an optimized parameter of pipeline stage {pp}")
        per_tp = [self._optimizer_entry(self.cells[(pp, tp)][0], index[pp][name]) for tp in range(self.tp)]
        if all(x is None for x in per_tp):
            return None
        if any(x is None for x in per_tp) or any(set(x) != set(per_tp[0]) for x in per_tp):
            raise CheckpointError(f"{self.dir}: tp ranks of stage {pp} disagree on the optimizer state of '{name}'")
        local_shape = self.shape(name, strip_padding=False)
        entry = self._entry(name)
        if entry["partition_dim"] is not None:
            local_shape[entry["partition_dim"]] //= self.tp
        out = {}
        for key in per_tp[0]:
            def shard(tp: int, key=key) -> torch.Tensor:
                def held(rank: int) -> torch.Tensor:  # per rank: an ep rank's entry names its own tensors
                    entry = self._optimizer_entry(rank, index[pp][name])
                    return self._get(rank, _key(entry[key], f"rank {rank}'s {key} of '{name}'"))
                return self._across_experts(name, pp, tp, held)

            value = shard(0)
            if list(value.shape) != local_shape:  # the step count (a scalar), identical on every tp rank
                out[key] = value.clone()
            else:  # per-element: assembled like the weight
                out[key] = self._join(name, shard, f"the {key} of '{name}'", strip_padding=True)
        return out

    def _optimizer_entry(self, rank: int, index: int) -> dict | None:
        state = ((self.skeletons[rank].get("engine") or {}).get("optimizer") or {}).get("state")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.dir}: rank {rank}'s engine state has no optimizer state")
        if "__dict__" in state:  # int keys are stored as a list of [key, value] pairs (checkpoint.state)
            state = {int(k): v for k, v in state["__dict__"]}
        return state.get(index, state.get(str(index)))

    def view(self, meta: bool = False) -> "StateView":
        """A read-only name -> tensor mapping over this checkpoint (meta: shapes only, nothing read)."""
        return StateView(self, meta)


class StateView(Mapping):
    """name -> full tensor, read on every access and never cached (so a converter holds one at a time).

    With `is_meta` the values are meta-device tensors of the right shape: a dry run of a conversion
    checks every name and shape, and sizes the output files, without reading any data.
    """

    def __init__(self, reader: CheckpointReader, is_meta: bool):
        self.reader, self.is_meta = reader, is_meta

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.reader.owner:
            raise KeyError(name)
        if self.is_meta:
            return torch.empty(self.reader.shape(name), dtype=torch.float32, device="meta")
        return self.reader.read(name)

    def __contains__(self, name) -> bool:
        return name in self.reader.owner

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.owner)

    def __len__(self) -> int:
        return len(self.reader.owner)
