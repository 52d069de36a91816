"""Triton kernels of fastmask (installed as ``fastmask.kernels``).

Import this package only where Triton can run: on CUDA tensors, or on CPU with
``TRITON_INTERPRET=1`` set before Triton is first imported. The triton backend
(``fastmask.backends.triton``) imports it lazily, on the first call that uses it.
"""
