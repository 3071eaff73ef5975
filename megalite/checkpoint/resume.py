"""Whether this run can resume a checkpoint, and what to run when it cannot.

A rank resumes from its own file, so the checkpoint must have been written by the same number of
ranks in the same layout (tp, pp, virtual stages: which blocks and shards a rank holds; the rank
order: which rank holds which coordinates; the partition: which blocks a stage holds), and with
the same data order (else the run would repeat some samples and skip others). Each refusal names
both values and the fix; a layout change names the `megalite convert reshard` command to run.
"""
from __future__ import annotations

from megalite.checkpoint.io import (
    MANIFEST,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    rank_files,
    read_json,
    read_manifest,
    step_directory,
    tensor_names,
    verify,
)
from megalite.checkpoint.schema import Layout, RankState


def resume_point(root, resume: str):
    """The step directory a run resumes from (train.resume: 'auto', 'none' or a path), or None to start afresh.

    'auto' starts afresh only on a checkpoint root that holds no checkpoint (io.latest_checkpoint)."""
    if resume == "none":
        return None
    return latest_checkpoint(root) if resume == "auto" else step_directory(resume)


def check_before_resume(path, rank: int, now: Layout, order_now: dict) -> None:
    """Everything a resume needs that can fail, checked before the run writes anything: the world size,
    every file the manifest lists (present, with its size; this rank's also with its sha256), and this
    rank's saved layout and data order against the run's. Reads this rank's files once, loads nothing."""
    check_world_size(path, now)
    try:
        verify(path, read_json(path / MANIFEST, "the checkpoint manifest"), rank)
        tensor_names(path / rank_files(rank)[0])
        doc = read_json(path / rank_files(rank)[1], "this rank's non-tensor state")
    except CheckpointError as e:
        earlier = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
        if not earlier:
            raise
        raise CheckpointError(f"{e}; to resume from the checkpoint before it instead: train.resume={earlier[-1]}") \
            from None
    skeleton = doc.get("skeleton") if isinstance(doc, dict) else None
    check_resumable(path, RankState.from_dict(skeleton, path / rank_files(rank)[1]), now, order_now)


def data_order(cfg) -> dict:
    """The settings that decide which training sample comes at which step (recorded in every checkpoint).

    train.steps is not among them: the sample order is prefix-stable, so a run may be extended."""
    d, t = cfg.data, cfg.train
    return {"data.path": [str(p) for p in d.path], "data.split": str(d.split), "data.seq_len": int(d.seq_len),
            "data.seed": int(d.seed), "train.global_batch_size": int(t.global_batch_size), "train.seed": int(t.seed)}


def reshard_command(path, layout: Layout) -> str:
    """The command that writes a copy of checkpoint `path` for `layout`."""
    cp = (f" --cp {layout.cp}" if layout.cp > 1 else "") + (f" --ep {layout.ep}" if layout.ep > 1 else "")
    return (f"megalite convert reshard {path} OUT --tp {layout.tp} --pp {layout.pp}{cp} --dp {layout.dp} "
            f"--virtual-stages {layout.virtual_stages}")


def check_world_size(path, now: Layout) -> None:
    """Before any rank opens its file: the checkpoint was written by as many ranks as this run has."""
    saved = read_manifest(path)["world_size"]
    if saved != now.world_size:
        raise CheckpointError(f"{path} was written by {saved} ranks but this run has {now.world_size}; resume "
                              f"with {saved} ranks, or write a copy for this layout first: "
                              f"{reshard_command(path, now)}")


def check_resumable(path, state: RankState, now: Layout, order_now: dict) -> None:
    """The saved layout and data order are this run's; CheckpointError naming the difference otherwise."""
    saved = state.layout
    if (saved.tp, saved.pp, saved.virtual_stages, saved.cp) != (now.tp, now.pp, now.virtual_stages, now.cp):
        with_cp = saved.cp > 1 or now.cp > 1
        raise CheckpointError(f"{path} was written with {_cells(saved, with_cp)} but this run uses "
                              f"{_cells(now, with_cp)}; resume with that layout, or convert it first: "
                              f"{reshard_command(path, now)}")
    if saved.ep != now.ep:  # each rank's file holds its share of the experts
        raise CheckpointError(f"{path} was written with parallel.ep={saved.ep} but this run uses parallel.ep="
                              f"{now.ep}; resume with parallel.ep={saved.ep}, or convert it first: "
                              f"{reshard_command(path, now)}")
    for key in ("partition", "order"):
        if getattr(saved, key) != getattr(now, key):
            raise CheckpointError(f"{path} was written with parallel.{key}={getattr(saved, key)} but this run uses "
                                  f"parallel.{key}={getattr(now, key)}; resume with parallel.{key}="
                                  f"{getattr(saved, key)}")
    _check_data_order(state.progress.data_order, order_now, path)


def _cells(layout: Layout, with_cp: bool) -> str:
    """'tp=2 pp=2 virtual_stages=1' (with cp=N after tp when either side has context parallelism)."""
    cp = f" cp={layout.cp}" if with_cp else ""
    return f"tp={layout.tp}{cp} pp={layout.pp} virtual_stages={layout.virtual_stages}"


def _check_data_order(saved: dict | None, current: dict, path) -> None:
    """Checkpoints that recorded no data order (imported weights, older ones) are not checked."""
    if not saved:
        return
    changed = [key for key in saved if key in current and saved[key] != current[key]]
    if changed:
        lines = "; ".join(f"{key} was {saved[key]!r} and is now {current[key]!r}" for key in changed)
        keep = " ".join(f"{key}={_override(saved[key])}" for key in changed)
        raise CheckpointError(f"{path} cannot be resumed: {lines}. These settings decide which training sample "
                              f"comes next, so the run would repeat some samples and skip others. Keep the saved "
                              f"values ({keep}) to resume, or start a new run in a new train.run_dir (or "
                              f"checkpoint.dir)")


def _override(value) -> str:
    return "[" + ",".join(value) + "]" if isinstance(value, list) else str(value)
