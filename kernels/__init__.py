"""Triton kernels of fastmask (installed as ``fastmask.kernels``).

Import this package only where Triton can run: on CUDA tensors, or on CPU with
``TRITON_INTERPRET=1`` set before Triton is first imported. ``fastmask.ops``
imports it lazily, on the first call that uses the triton backend.
"""
