"""Triton kernels of fastmask (installed as ``fastmask.kernels``): ``@triton.jit`` code only.

``masked_step`` (the fused step's three passes), ``sampling`` (importance bins, inclusion
probabilities, the water level), ``philox`` (the counter RNG) and ``units`` (the low-level ops);
``aot`` compiles them all for a GPU target without one. Nothing here imports ``fastmask``: the
host side that lays out tables and launches them is ``fastmask.backends.triton``. Import this
package only where Triton can run: on CUDA tensors, or on CPU with ``TRITON_INTERPRET=1`` set
before Triton is first imported.
"""
