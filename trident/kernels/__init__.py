"""Triton kernels, each with a torch reference beside it (imported only where Triton is installed)."""
