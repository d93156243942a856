"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors and compare
them to the torch references. The interpreter is chosen when a kernel is decorated, which
roast_vllm.kernels does lazily on first launch, so setting the variable here is in time."""

import os

os.environ["TRITON_INTERPRET"] = "1"
