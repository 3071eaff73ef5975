"""CI checks for csrc/ that need no GPU, and the backend selection in megalite.kernels.

- every .cu compiles with the machine's nvcc for sm_80 and sm_90a with zero
  warnings (one nvcc per file, run in parallel: about 10-20 s on 2 cores);
- bindings.cpp passes `g++ -fsyntax-only` against the installed torch's
  headers (the CPU wheel ships c10/cuda but not its generated
  cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include,
  which only defines an export macro): about 10-20 s;
- the op schemas in bindings.cpp equal megalite.kernels.fused.SCHEMAS;
- MEGALITE_KERNELS and the device pick the backend, logged once.
"""
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from megalite import kernels
from megalite.kernels import fused, reference
from tests.tolerance import assert_close

CSRC = fused.CSRC
ARCH = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_include(nvcc: str) -> str:
    """The toolkit's include dir (nvcc may be a wrapper script on PATH, so ask it)."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for path in re.findall(r'"?-I"?([^"\s]+)', out):
        if os.path.exists(os.path.join(path, "cuda_runtime_api.h")):
            return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH); "
                                                       "csrc/ cannot be compiled on this machine")


@needs_nvcc
def test_every_cu_file_compiles_for_sm80_and_sm90a_without_warnings(tmp_path):
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    assert {os.path.basename(s) for s in sources} >= {"rmsnorm.cu", "rotary.cu"}
    procs = {src: subprocess.Popen([_nvcc(), "-c", *ARCH, "-O3", "-Werror", "all-warnings",
                                    "-Xcompiler", "-Wall,-Wextra,-Werror", "-I", CSRC, src,
                                    "-o", str(tmp_path / (os.path.basename(src) + ".o"))],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src in sources}
    for src, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "warning" not in out.lower(), f"{src}:\n{out}"
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0


@needs_nvcc
def test_bindings_cpp_syntax_checks_against_torch_headers():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) to syntax-check csrc/bindings.cpp")
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), _cuda_include(_nvcc()), sysconfig.get_paths()["include"]]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *[f for p in includes for f in ("-isystem", p)], "-I", CSRC, os.path.join(CSRC, "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_bindings_declare_exactly_the_schemas_fused_registers():
    text = open(os.path.join(CSRC, "bindings.cpp"), encoding="utf-8").read()
    declared = re.findall(r'm\.def\("([^"]+)"\)', text)
    assert sorted(declared) == sorted(fused.SCHEMAS.values())
    assert sorted(re.findall(r'm\.impl\("(\w+)"', text)) == sorted(fused.SCHEMAS)


@pytest.fixture
def fresh_choice(monkeypatch):
    """Clean per-device choices before and after, so env changes take effect and leak nowhere."""
    kernels._reset_backend_choice()
    yield monkeypatch
    kernels._reset_backend_choice()


def test_cpu_tensors_take_the_reference_path_in_every_mode(fresh_choice):
    for mode in ("auto", "fused", "reference"):
        fresh_choice.setenv("MEGALITE_KERNELS", mode)
        kernels._reset_backend_choice()
        assert kernels.backend("cpu") == "reference"
        x, w = torch.randn(3, 8), torch.randn(8)
        assert torch.equal(kernels.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))


def test_env_forces_reference_even_for_cuda_without_loading_anything(fresh_choice):
    fresh_choice.setenv("MEGALITE_KERNELS", "reference")
    fresh_choice.setattr(fused, "load", lambda: pytest.fail("the extension must not be loaded"))
    assert kernels.backend("cuda") == "reference"


def test_auto_uses_fused_for_cuda_only_when_the_extension_loads(fresh_choice):
    fresh_choice.delenv("MEGALITE_KERNELS", raising=False)
    fresh_choice.setattr(fused, "load", lambda: (True, "stub"))
    assert kernels._select_backend("cuda") == ("fused", fused)
    assert kernels.backend("cpu") == "reference"
    kernels._reset_backend_choice()
    fresh_choice.setattr(fused, "load", lambda: (False, "no extension here"))
    assert kernels._select_backend("cuda") == ("reference", reference)


def test_fused_mode_fails_loudly_and_bad_values_name_the_choices(fresh_choice):
    fresh_choice.setenv("MEGALITE_KERNELS", "fused")
    fresh_choice.setattr(fused, "load", lambda: (False, "nvcc exploded"))
    with pytest.raises(RuntimeError, match="nvcc exploded"):
        kernels.backend("cuda")
    fresh_choice.setenv("MEGALITE_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, reference, fused"):
        kernels.backend("cpu")


def test_choice_is_logged_once_with_the_reason(fresh_choice, caplog):
    fresh_choice.delenv("MEGALITE_KERNELS", raising=False)
    x = torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="megalite.kernels"):
        for _ in range(3):
            kernels.rms_norm(x, None, 1e-5)
    records = [r for r in caplog.records if r.name == "megalite.kernels"]
    assert len(records) == 1 and "reference" in records[0].getMessage() and "CUDA-only" in records[0].getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_load_explains_why_without_cuda():
    ok, why = fused._load_once()
    assert not ok and "CUDA" in why


def test_setup_py_runs_and_skips_the_extension_without_a_cuda_torch():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: setup.py builds the extension here")
    root = os.path.dirname(CSRC)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "megalite", proc.stderr[-2000:]


def test_dispatch_compiles_without_graph_breaks_even_on_its_first_call(fresh_choice):
    fresh_choice.delenv("MEGALITE_KERNELS", raising=False)
    cos, sin = reference.rope_cos_sin(6, 8)
    w = torch.randn(8)

    def block(x):
        h = kernels.rms_norm(x, w, 1e-5)
        return kernels.apply_rotary(h.view(6, 2, 1, 8), cos, sin, interleaved=True)

    x = torch.randn(6, 2, 8)
    torch._dynamo.reset()
    kernels.mark_choices_constant()  # what train.compile does first (megalite does not import Dynamo itself)
    got = torch.compile(block, backend="eager", fullgraph=True)(x)  # the choice is made while tracing
    # the compiled graph (backend="eager") runs the same ops: equal to a few fp32 ulps (rtol 1e-6, ~8 ulps)
    assert_close(got, block(x), rtol=1e-6, atol_frac=1e-6, what="compiled block")
    assert kernels._choice["cpu"][0] == "reference"
