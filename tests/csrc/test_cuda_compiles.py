"""The cuda backend compiles without a GPU: its kernels for Hopper (sm_90) with nvcc, and its
torch binding type-checks against the installed torch's headers.

The kernels are plain CUDA, so nvcc builds them whatever build of torch is installed. The
binding (masked_step.cpp) needs c10/cuda headers that a CPU build of torch lacks; small
stand-ins (tests/csrc/stubs) declare the two it uses, so ``g++ -fsyntax-only`` checks
every other line of it (a check that caught an ambiguous overload no CUDA machine had seen).
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from fastmask.backends.native import csrc_dir

NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
STUBS = Path(__file__).parent / "stubs"


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script, so look around)."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", NVCC and Path(NVCC).resolve().parent.parent]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm90(tmp_path):
    source = csrc_dir() / "cuda" / "masked_step_kernels.cu"
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "--fmad=false", "-gencode=arch=compute_90,code=sm_90", "-c", str(source),
         "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "kernels.o").stat().st_size > 0


@pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs g++ and the CUDA toolkit's headers")
def test_cuda_binding_type_checks():
    includes = [f"-I{STUBS}", *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
                f"-I{_cuda_include()}"]
    result = subprocess.run(
        [CXX, "-std=c++20", "-fsyntax-only", "-Werror=return-type", "-DTORCH_EXTENSION_NAME=fastmask_cuda",
         *includes, str(csrc_dir() / "cuda" / "masked_step.cpp")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
