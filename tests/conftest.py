"""Test-wide setup: on a machine without CUDA, Triton runs in its interpreter.

TRITON_INTERPRET must be set before Triton is first imported; fastmask imports
Triton lazily, so setting it here, before any test module runs, is enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmask.backends.registry import unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in ("triton", "cpp", "cuda") if unavailable_reason(b, DEVICE) is None]
INTERPRETED = DEVICE.type == "cpu"  # Triton on CPU: the interpreter (fp32, small sizes)
