"""The backends: per-device implementations of the ops that ``fastmask.ops`` defines.

``registry`` is the one place that says what runs where (and why not); each backend module
registers its implementations there on import:

- ``torch``: the reference (``fastmask.reference``), every op, any device;
- ``triton``: the kernels of ``fastmask.kernels`` (CUDA tensors; CPU under TRITON_INTERPRET=1);
- ``cpp``: ``csrc/cpu``, compiled on first use (CPU tensors);
- ``cuda``: ``csrc/cuda``, compiled on first use (CUDA tensors);
- ``native``: what the compiled backends share (working copies, the typed C++ config,
  building an extension on first use).
"""

from . import cpp, cuda, registry, torch, triton  # noqa: F401  (each registers its implementations)
