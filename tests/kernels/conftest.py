"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors and compare
them to the torch references. The interpreter is chosen when a kernel is decorated, which
roast_vllm.kernels does lazily on first launch, so setting the variable here is in time."""

import os

os.environ["TRITON_INTERPRET"] = "1"


def run_isolated(code: str, *args: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh Python (same env, so the same interpreter mode) and return
    its stdout. For launches that may crash the process (a wild address from an offset
    overflow is a segfault, which would take pytest down with it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"the launch died with exit code {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout
