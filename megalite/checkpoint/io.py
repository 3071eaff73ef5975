"""Atomic, verified, rank-aware checkpoint directories.

Layout under a checkpoint root:

    root/
      latest                     text: the name of the newest complete step directory
      step_00000100/
        manifest.json            step, world_size, every file with its size and sha256
        rank_00000.safetensors   this rank's tensors (flattened by checkpoint.state)
        rank_00000.json          this rank's skeleton: everything that is not a tensor
        rank_00001.safetensors ...
        config.yaml              the run's resolved config (extra files, written by rank 0)
      step_00000200.tmp/         a save in progress (or killed): ignored, cleaned by the next save
      .lock                      held (flock) by the run that saves here: megalite.distributed.run_lock

A save becomes visible in three atomic moves, each made durable with fsync
before the next: every rank's files, then the manifest and the rename of
`step_N.tmp` to `step_N`, then the `latest` pointer (written to latest.tmp
and os.replace'd). A crash at any point leaves `latest` naming the previous
complete checkpoint, and every phase is reported to an optional hook (the
fault tests kill a process there). A full disk removes the partial save and
says so. Loading reads safetensors and JSON only: nothing is
unpickled, so a checkpoint from an untrusted source cannot run code.
All ranks must see the same filesystem under `root`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from megalite.checkpoint.state import flatten, unflatten
from megalite.distributed.run_lock import RunLock

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "megalite-checkpoint"
STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this run."""


class CheckpointWarning(UserWarning):
    """A checkpoint root needed a decision the user did not write (e.g. resuming without `latest`)."""


class SaveFailed(RuntimeError):
    """A save could not be finished (the disk is full); its partial files are gone, `latest` is unchanged."""


# Called with the name of each phase a save passes (the fault tests kill a process there, deterministically):
# "tensors" (this rank's tensors written), "renamed" (step directory published, pointer not moved yet),
# "pruning" (an old checkpoint renamed for deletion, not yet deleted).
PhaseHook = Callable[[str], None] | None


def _phase(on_phase: PhaseHook, name: str) -> None:
    if on_phase is not None:
        on_phase(name)


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint for `step`."""
    return f"step_{step:08d}"


def rank_files(rank: int) -> tuple[str, str]:
    """(tensor file, skeleton file) names of `rank` inside a step directory."""
    return f"rank_{rank:05d}.safetensors", f"rank_{rank:05d}.json"


def _fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a directory, so a rename or a write survives power loss."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows; renames there are durable anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sync(barrier: Callable[[], object] | None) -> None:
    if barrier is not None:
        barrier()


def write_rank(tmp: Path, rank: int, state: dict, on_phase: PhaseHook = None) -> None:
    """Write this rank's tensors and skeleton into the unfinished step directory `tmp`, fsynced, plus a
    digest file that `publish` merges into the manifest."""
    tensors, skeleton = flatten(state)
    st_name, js_name = rank_files(rank)
    try:
        save_file(tensors, tmp / st_name, metadata={"format": "pt", "writer": FORMAT})
    except SafetensorError as e:  # its own type even for the OS's errors: give a full disk back its errno
        if "os error 28" in str(e) or "No space left" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / st_name)) from e
        raise
    _phase(on_phase, "tensors")  # the tensors are on disk, the skeleton and the digest are not yet
    _fsync_path(tmp / st_name)
    _write_durable(tmp / js_name, json.dumps({"version": 1, "skeleton": skeleton}, allow_nan=False))
    # each rank hashes its own files, in parallel, instead of rank 0 reading the whole checkpoint
    digest = {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in (st_name, js_name)}
    _write_durable(tmp / f"rank_{rank:05d}.digest", json.dumps(digest))


def write_extra(tmp: Path, extra_files: dict[str, str]) -> None:
    """Extra text files of a step (the run's config.yaml), fsynced, with a digest `publish` lists them by."""
    digest = {}
    for name, text in extra_files.items():
        if Path(name).name != name or name == MANIFEST or name.startswith("rank_"):
            raise ValueError(f"extra checkpoint file {name!r} must be a plain file name other than "
                             f"{MANIFEST} and rank_*")
        _write_durable(tmp / name, text)
        digest[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    _write_durable(tmp / "extra.digest", json.dumps(digest))


def _write_manifest(tmp: Path, step: int, world_size: int) -> None:
    files = {}
    extra = tmp / "extra.digest"
    if extra.is_file():
        files.update(json.loads(extra.read_text()))
        extra.unlink()
    for r in range(world_size):
        digest = tmp / f"rank_{r:05d}.digest"
        if not digest.is_file():
            raise CheckpointError(f"rank {r} of {world_size} did not finish writing {tmp}; not publishing it")
        files.update(json.loads(digest.read_text()))
        digest.unlink()
    manifest = {"format": FORMAT, "version": 1, "step": step, "world_size": world_size, "files": files}
    _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_path(tmp)


def _point_latest(root: Path, name: str) -> None:
    """Atomically make `latest` name `name` (write a temp file, fsync, os.replace, fsync the root)."""
    _write_durable(root / (LATEST + ".tmp"), name + "\n")
    os.replace(root / (LATEST + ".tmp"), root / LATEST)
    _fsync_path(root)


def publish(root: Path, tmp: Path, final: Path, step: int, world_size: int, on_phase: PhaseHook = None) -> None:
    """Make the finished step directory `tmp` (every rank written) the checkpoint `final` and point
    `latest` at it, each move durable before the next (see the module docstring)."""
    _write_manifest(tmp, step, world_size)
    replaced = None
    if final.exists():  # saving a step again (a resumed run): move the old copy out of the way first
        replaced = root / f"{final.name}.replaced.tmp"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_path(root)
    _phase(on_phase, "renamed")  # the step directory is complete, `latest` still names the previous one
    _point_latest(root, final.name)  # LAST: only now does the new checkpoint become the one to resume
    if replaced is not None:
        shutil.rmtree(replaced)


def complete_checkpoints(root: Path) -> list[Path]:
    """Published step directories (with a manifest), oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def _remove_stale(root: Path) -> None:
    """Delete leftovers of killed saves: step_*.tmp directories and latest.tmp."""
    for p in root.iterdir():
        if p.name.startswith("step_") and p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p)
    (root / (LATEST + ".tmp")).unlink(missing_ok=True)


def _prune(root: Path, keep_last: int, on_phase: PhaseHook = None) -> None:
    """Delete complete checkpoints beyond the newest keep_last, never the one `latest` names."""
    if keep_last <= 0:
        return
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name == pointed:
            continue
        # rename first: a crash mid-delete then leaves a *.tmp (ignored) rather than a
        # directory whose manifest still promises files that are gone
        doomed = root / f"{old.name}.deleting.tmp"
        os.rename(old, doomed)
        _phase(on_phase, "pruning")
        shutil.rmtree(doomed)


def save_checkpoint(root, step: int, rank: int, state: dict, world_size: int = 1,
                    barrier: Callable[[], object] | None = None, keep_last: int = 2,
                    extra_files: dict[str, str] | None = None, on_phase: PhaseHook = None) -> Path:
    """Write this rank's `state` into root/step_{step:08d} and, on rank 0, publish it.

    `extra_files` (name -> text; rank 0's are used) go into the step directory
    too, listed in the manifest and published with the rest (the trainer puts
    the run's config.yaml there, so a checkpoint copied or kept outside its run
    directory still says how it was made).

    Every rank calls this with its own state. `barrier` (e.g.
    torch.distributed.barrier) is required when world_size > 1; it is called
    three times: after rank 0 cleaned stale saves, after all ranks wrote, and
    after rank 0 published, so every rank returns only once `latest` moved.
    keep_last <= 0 keeps every checkpoint. `on_phase` is told each phase the save passes (PhaseHook).
    A full disk raises SaveFailed (after removing what this save wrote) naming the bytes needed, the
    bytes free and the checkpoint `latest` still names. Returns the step directory.
    """
    if step < 0 or not 0 <= rank < world_size:
        raise ValueError(f"need step >= 0 and 0 <= rank < world_size; got step={step}, rank={rank}, "
                         f"world_size={world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError(f"world_size={world_size} needs a barrier (e.g. torch.distributed.barrier) so rank 0 "
                         "publishes only after every rank has written")
    root = Path(root)
    # rank 0 holds the root's lock for the save (re-entrant: the Trainer already holds it), so its cleanup
    # of unfinished saves below can never remove the save in progress of another run
    with RunLock([root]) if rank == 0 else nullcontext():
        return _save(root, step, rank, state, world_size, barrier, keep_last, extra_files, on_phase)


def _save(root: Path, step: int, rank: int, state: dict, world_size: int, barrier, keep_last: int,
          extra_files: dict[str, str] | None, on_phase: PhaseHook) -> Path:
    tmp, final = root / (step_dir_name(step) + ".tmp"), root / step_dir_name(step)
    if rank == 0:
        _remove_stale(root)
    _sync(barrier)  # nobody writes into tmp before rank 0 has removed a stale one
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        write_rank(tmp, rank, state, on_phase)
        if rank == 0 and extra_files:
            write_extra(tmp, extra_files)
        _sync(barrier)
        if rank == 0:
            publish(root, tmp, final, step, world_size, on_phase)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(root, tmp, rank, world_size, state, e) from e
    if rank == 0:
        _prune(root, keep_last, on_phase)
    _sync(barrier)
    return final


def _disk_full(root: Path, tmp: Path, rank: int, world_size: int, state: dict, error: OSError) -> SaveFailed:
    """Remove what the failed save wrote (all of it with one rank; this rank's files otherwise, the next
    save's cleanup takes the rest) and say what the save needed."""
    if world_size == 1:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        for name in (*rank_files(rank), f"rank_{rank:05d}.digest"):
            (tmp / name).unlink(missing_ok=True)
    needed = sum(t.numel() * t.element_size() for t in flatten(state)[0].values())
    free = shutil.disk_usage(root).free
    pointer = root / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else "nothing (no checkpoint was published yet)"
    return SaveFailed(f"saving {tmp.name[:-4]} to {root} failed: {error.strerror} (rank {rank} needs about "
                      f"{needed:,} bytes, {free:,} are free); removed the partial save; `latest` still names "
                      f"{latest}. Free space there (or set checkpoint.dir elsewhere) and resume")


def latest_checkpoint(root) -> Path | None:
    """The step directory to resume from: the one `root/latest` names; None only when `root` holds no
    checkpoint at all, so that a lost pointer never restarts a run from scratch.

    Without a usable pointer (deleted, or naming a missing directory after a crash between the two
    renames of a re-saved step) the newest complete step directory is used, with a CheckpointWarning.
    Step directories that are all incomplete (no manifest), or a pointer that is not a step name,
    are refused, naming what is there.
    """
    root = Path(root)
    pointer = root / LATEST
    complete = complete_checkpoints(root)
    if not pointer.is_file():
        if complete:
            warnings.warn(f"{root} has no '{LATEST}' pointer; resuming from the newest complete checkpoint "
                          f"{complete[-1].name}", CheckpointWarning, stacklevel=2)
            return complete[-1]
        _refuse_incomplete(root)
        return None
    name = pointer.read_text(errors="replace").strip()
    if not STEP_RE.match(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not a step directory name like step_00000100; write the "
                              f"name of the checkpoint to resume into it ({_listing(complete)}), or set "
                              "train.resume to a step directory")
    if (root / name / MANIFEST).is_file():
        return root / name
    if not complete:
        raise CheckpointError(f"{pointer} names {name}, which is missing, and {root} holds no complete checkpoint "
                              "(no step directory with a manifest.json); restore one, or set train.resume=none in a "
                              "new train.run_dir to start afresh")
    warnings.warn(f"{pointer} names missing {name}; using the newest complete checkpoint {complete[-1].name}",
                  CheckpointWarning, stacklevel=2)
    return complete[-1]


def _listing(complete: list[Path]) -> str:
    return "complete ones here: " + ", ".join(p.name for p in complete[-5:]) if complete else \
        "none here is complete"


def _refuse_incomplete(root: Path) -> None:
    """Step directories without a manifest (damaged, or copied in part) are not a reason to start afresh."""
    if not root.is_dir():
        return
    damaged = sorted(p.name for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir())
    if damaged:
        raise CheckpointError(f"{root} holds step directories but none is complete (no {MANIFEST}): "
                              f"{', '.join(damaged[-5:])}; restore a complete checkpoint there, or use a new "
                              "checkpoint.dir (or train.resume=none) to start afresh")


def step_directory(path) -> Path:
    """A step directory as given, or the one a checkpoint root resumes from; CheckpointError otherwise."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if (p / LATEST).is_file() or complete_checkpoints(p):
        return latest_checkpoint(p)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"{p} is an unfinished save (a .tmp directory); load a complete step directory")
    raise CheckpointError(f"{p} is neither a step directory (no {MANIFEST}) nor a checkpoint root (no '{LATEST}')")


def read_json(path: Path, what: str) -> dict:
    """The JSON document at `path`; CheckpointError naming the file (and `what` it is) when missing or bad."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({what}): {e}") from e


def verify(d: Path, manifest: dict, rank: int) -> None:
    """Every listed file present with its size; this rank's files also match their sha256."""
    files, world = manifest.get("files"), manifest.get("world_size")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(world, int):
        raise CheckpointError(f"{d / MANIFEST} is not a {FORMAT} manifest")
    if not 0 <= rank < world:
        raise CheckpointError(f"{d} was written by {world} rank(s); rank {rank} has no shard in it "
                              "(run with the same world size or reshard it)")
    mine = rank_files(rank)
    for name in mine:
        if name not in files:
            raise CheckpointError(f"{d / MANIFEST} does not list {name}")
    for name, info in files.items():
        if Path(name).name != name:  # a manifest must not reach outside its directory
            raise CheckpointError(f"{d / MANIFEST} lists {name!r}, which is not a plain file name")
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes but {MANIFEST} says {info['size']}: "
                                  "truncated or overwritten")
        if name in mine and _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupted")


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, from its header alone; CheckpointError when it is not one."""
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every malformed file
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def read_manifest(path_or_root) -> dict:
    """The manifest (step, world_size, files) of a step directory, or of a root's `latest`."""
    return read_json(step_directory(path_or_root) / MANIFEST, "the checkpoint manifest")


def load_checkpoint(path_or_root, rank: int = 0, verified: bool = False) -> dict:
    """This rank's state from a step directory, or from a root (following `latest`).

    Verifies the manifest first (sizes, and this rank's sha256), unless the caller just did
    (`verified`: checkpoint.resume.check_before_resume); every failure is a CheckpointError naming the file.
    """
    d = step_directory(path_or_root)
    if not verified:
        verify(d, read_json(d / MANIFEST, "the checkpoint manifest"), rank)
    st_name, js_name = rank_files(rank)
    try:
        tensors = load_file(d / st_name, device="cpu")
    except Exception as e:  # safetensors raises its own error types for every malformed file
        raise CheckpointError(f"{d / st_name} is not a readable safetensors file: {e}") from e
    doc = read_json(d / js_name, "this rank's non-tensor state")
    if "skeleton" not in doc:
        raise CheckpointError(f"{d / js_name} has no 'skeleton' entry")
    try:
        return unflatten(tensors, doc["skeleton"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / js_name} does not fit {d / st_name}: {e}") from e


@contextmanager
def fresh_output(out_dir) -> Iterator[Path]:
    """Write a converter's output in OUT.tmp (yielded) and rename it to OUT when the body succeeds.

    OUT must not exist or be empty; a refused or failed conversion leaves neither OUT nor OUT.tmp.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output {out} exists and is not empty; choose a new directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
