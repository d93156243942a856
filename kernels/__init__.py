"""Kernels with their pure-torch references (installed as ``roast_vllm.kernels``)."""
