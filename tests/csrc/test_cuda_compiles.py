"""The CUDA kernels compile for Hopper (sm_90) with nvcc (compile only, no GPU needed).

They are plain CUDA (the torch binding lives in masked_step.cpp), so this catches
breakage on any machine with nvcc, whatever build of torch is installed.
"""

import shutil
import subprocess

import pytest

from fastmask.ops._native import csrc_dir

NVCC = shutil.which("nvcc")


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
