"""A checkpoint of any layout read one full tensor at a time, and safetensors shards written as tensors arrive.

`CheckpointReader` opens a step directory written at any (tp, pp, dp), by the
native engine or DeepSpeed ZeRO 0-3, without the cluster that wrote it: it
verifies the manifest (every file's size, every rank's sha256, hashed in 1 MiB
chunks), reads every rank's JSON skeleton, and indexes where each tensor's
pieces live. `read(name)` then fetches only that tensor's pieces from the
rank files (safetensors `safe_open`, so nothing else is loaded): the tp shards
of the pipeline stage that holds it, each shard joined from the ZeRO slices of
every dp rank of its (pp, tp) cell when the checkpoint is ZeRO-partitioned
(engine state "params": start, numel, shape, fp32 master), else taken from
the saved model weights. Replicated tensors are checked equal across tp ranks.

`write_safetensors` writes (name, tensor) pairs as they come: the file plan is
made up front from the names and sizes alone (a meta-device dry run of the
conversion gives them), so each output file is written and dropped as soon as
its last tensor arrives.

Peak memory of a streamed export (hf.export_hf): the tensors of one output
file (at most max_shard_bytes, or one larger tensor alone; safetensors'
save_file briefly holds a serialised copy too) plus one full megalite tensor
being converted (the largest is the vocabulary table or a fused qkv / fc1),
plus, for ZeRO checkpoints, that tensor's local flat buffer and one dp slice.
Pages of the memory-mapped rank files are the page cache's, not the process's.
"""
from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file

from megalite.checkpoint.io import MANIFEST, CheckpointError, _rank_files, _read_json, _verify

_OPEN_FILES = 64  # rank files kept open at once (a checkpoint of thousands of ranks must not exhaust fds)


def _key(node, where: str) -> str:
    """The safetensors key a skeleton node refers to."""
    if not isinstance(node, dict) or "__tensor__" not in node:
        raise CheckpointError(f"{where} is not a tensor reference in the rank's skeleton")
    return node["__tensor__"]


class CheckpointReader:
    """Full tensors of a megalite checkpoint (root or step directory), read one at a time on demand."""

    def __init__(self, checkpoint, order: str = "tp-dp-pp"):
        from megalite.checkpoint.consolidate import _step_dir

        self.dir = d = _step_dir(checkpoint)
        manifest = _read_json(d / MANIFEST, "the checkpoint manifest")
        world = manifest.get("world_size")
        if not isinstance(world, int) or world < 1:
            raise CheckpointError(f"{d / MANIFEST} has no valid world_size; not a megalite checkpoint")
        self.skeletons = []
        for rank in range(world):
            _verify(d, manifest, rank)  # sizes of all files, sha256 of this rank's: a corrupt file is named
            doc = _read_json(d / _rank_files(rank)[1], "this rank's non-tensor state")
            self.skeletons.append(doc.get("skeleton") or {})
        self._handles: OrderedDict = OrderedDict()
        self._index(order)

    def _index(self, order: str) -> None:
        """cells (pp, tp) -> ranks by dp; per stage its shard metadata; which stage owns each name."""
        cells: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
        for rank, skel in enumerate(self.skeletons):
            c = (skel.get("engine") or {}).get("coords") or self._coords(skel, rank, order)
            cells[(c["pp"], c["tp"])][c["dp"]] = rank
        self.cells = {k: [v[dp] for dp in sorted(v)] for k, v in cells.items()}
        self.pp = 1 + max(pp for pp, _ in self.cells)
        self.tp = 1 + max(tp for _, tp in self.cells)
        if len(self.cells) != self.pp * self.tp:
            raise CheckpointError(f"{self.dir}: ranks cover (pp, tp) cells {sorted(self.cells)}, not a full "
                                  f"{self.pp} x {self.tp} grid; is a rank's file from another checkpoint?")
        self.meta, self.owner, self.zero = {}, {}, {}
        for pp in range(self.pp):
            first = self.skeletons[self.cells[(pp, 0)][0]]
            meta = first.get("shards") or (first.get("engine") or {}).get("shard_metadata")
            if not meta:
                raise CheckpointError(f"{self.dir} (pipeline stage {pp}) has no shard metadata ('shards'); it was "
                                      "written by an older megalite")
            self.meta[pp] = meta
            for name in meta:
                self.owner.setdefault(name, pp)
            for tp in range(self.tp):
                self.zero[(pp, tp)] = self._zero_index(self.cells[(pp, tp)])

    def _coords(self, skel: dict, rank: int, order: str) -> dict:
        from megalite.topology.grid import Topology

        lay = skel.get("layout") or {}
        try:
            topo = Topology.from_world(int(lay["world_size"]), tp=int(lay["tp"]), pp=int(lay["pp"]),
                                       virtual_stages=int(lay.get("virtual_stages", 1)),
                                       order=lay.get("order", order))  # recorded order wins
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.dir}: rank {rank}'s layout {lay!r} is unreadable ({e})") from e
        c = topo.coords(rank)
        return {"tp": c.tp, "pp": c.pp, "dp": c.dp}

    def _zero_index(self, ranks: list[int]) -> dict[str, list[tuple[int, dict]]]:
        """name -> [(rank, ZeRO slice entry)] over a cell's dp ranks; aliases map to their parameter's list."""
        engine = self.skeletons[ranks[0]].get("engine") or {}
        if engine.get("backend") != "deepspeed" or "params" not in engine:
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

    def shape(self, name: str) -> list[int]:
        """Full shape of `name`, vocabulary padding stripped (from the metadata; nothing is read)."""
        entry = self._entry(name)
        shape = list(entry["full_shape"])
        if "valid_rows" in entry:
            shape[0] = int(entry["valid_rows"])
        return shape

    def _entry(self, name: str) -> dict:
        if name not in self.owner:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint {self.dir}")
        return self.meta[self.owner[name]][name]

    def _get(self, rank: int, key: str, sliced: tuple | None = None) -> torch.Tensor:
        """Tensor `key` of rank `rank`'s file (only that tensor is read)."""
        from safetensors import safe_open

        path = self.dir / _rank_files(rank)[0]
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

    def _local(self, pp: int, tp: int, name: str) -> torch.Tensor:
        """This (pp, tp) cell's whole local (tp-sharded) fp32 tensor `name`."""
        pieces = self.zero[(pp, tp)].get(name)
        if not pieces:
            rank = self.cells[(pp, tp)][0]
            node = (self.skeletons[rank].get("model") or {}).get(name)
            return self._get(rank, _key(node, f"rank {rank}'s model['{name}']")).float()
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

    def read(self, name: str) -> torch.Tensor:
        """The full fp32 tensor `name` (tp shards joined, ZeRO slices joined, vocabulary padding stripped)."""
        entry, pp = self._entry(name), self.owner[name]
        dim, want = entry["partition_dim"], list(entry["full_shape"])
        if dim is None:
            full = self._local(pp, 0, name)
            for tp in range(1, self.tp):
                if not torch.equal(self._local(pp, tp, name), full):
                    raise CheckpointError(f"{self.dir}: '{name}' is replicated across tp ranks but tp rank {tp} "
                                          "differs from rank 0; the checkpoint's replicas diverged")
        else:
            full = torch.cat([self._local(pp, tp, name) for tp in range(self.tp)], dim=dim)
        if list(full.shape) != want:
            raise CheckpointError(f"{self.dir}: '{name}' assembles to shape {list(full.shape)} but its metadata "
                                  f"says {want}; the checkpoint is inconsistent")
        return full[: entry["valid_rows"]] if "valid_rows" in entry else full

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


# ------------------------------------------------------------------ writing
def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped, in order, into files of at most max_bytes (a larger tensor gets a file of its own)."""
    shards, current, used = [], [], 0
    for name, n in sizes:
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    return shards + [current] if current else shards


def write_safetensors(named: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int,
                      dtype: torch.dtype = torch.float32, plan: list[tuple[str, list[int]]] | None = None
                      ) -> list[str]:
    """Write model.safetensors, or model-XXXXX-of-YYYYY.safetensors + index when larger than max_shard_bytes.

    `plan` lists (name, shape) in the order `named` will yield them; with it, `named` is consumed
    lazily and each file is written as soon as its last tensor arrives. Without it, `named` is
    materialised first. Returns the file names written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_bytes} must be positive")
    if plan is None:
        named = list(named)
        plan = [(n, list(t.shape)) for n, t in named]
    size = torch.tensor([], dtype=dtype).element_size()
    files = plan_shards([(n, size * int(torch.Size(s).numel())) for n, s in plan], max_shard_bytes)
    fnames = (["model.safetensors"] if len(files) == 1 else
              [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)])
    order = iter([(name, k) for k, names in enumerate(files) for name in names])
    buffer: dict[str, torch.Tensor] = {}
    weight_map, total = {}, 0
    for name, tensor in named:
        want, k = next(order, (None, None))
        if name != want:
            raise RuntimeError(f"conversion yielded '{name}' where its dry run planned '{want}'")
        buffer[name] = tensor.to(dtype).contiguous()
        if len(buffer) == len(files[k]):  # the file's last tensor: write it and let its tensors go
            save_file(buffer, out_dir / fnames[k], metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in buffer.values())
            weight_map.update(dict.fromkeys(buffer, fnames[k]))
            buffer = {}
    if (missing := next(order, None)) is not None:
        raise RuntimeError(f"conversion ended before '{missing[0]}' that its dry run planned")
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return fnames
