"""Triton kernels and their pure-torch references (installed as ``lowrank.kernels``)."""
