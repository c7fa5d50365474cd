"""Compute kernels. One file per op: the launcher(s), the CPU path where torch has one, and a plain
torch `<op>_ref` that every other path is tested against. Triton kernels join these files."""
