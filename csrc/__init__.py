"""The C++/CUDA sources of fastmask (installed as ``fastmask.csrc``, compiled on first use)."""
