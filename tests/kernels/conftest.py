"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors and compare
them to the torch references. The interpreter is chosen when a kernel is decorated, which
roast_vllm.kernels does lazily on first launch, so setting the variable here is in time."""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def count_launches(monkeypatch):
    """``count_launches(module, "name_triton")`` -> a list that gets the first argument's
    shape of every call of that launcher (ops call their launcher through the module)."""

    def install(module, name: str) -> list:
        calls = []
        real = getattr(module, name)

        def counting(*a, **k):
            calls.append(a[0].shape)
            return real(*a, **k)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install


def run_isolated(code: str, *args: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh Python (same env, so the same interpreter mode) and return
    its stdout. For launches that may crash the process (a wild address from an offset
    overflow is a segfault, which would take pytest down with it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"the launch died with exit code {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def aten_ops():
    """A dispatch mode that records the name of every aten op run under it (``.ops``): to
    check what a path does, e.g. that an unsteered step only scans the slots."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AtenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    return AtenOps()
