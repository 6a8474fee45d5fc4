"""Triton kernels with autograd wrappers, installed as `megacpt.kernels`."""
