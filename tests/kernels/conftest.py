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


def compile_and_run(fn, *args):
    """``(f, out, src, cpp_kernels)``: ``f`` = ``fn`` compiled by inductor (fullgraph, after
    a fresh dynamo cache, so nothing is reused from an earlier test), ``out = f(*args)``,
    the generated code and the number of C++ kernels in it (each a pass over its tensors).
    Call ``f`` again to rerun the same compiled graph."""
    import torch
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    f = torch.compile(fn, backend="inductor", fullgraph=True)
    out, code = run_and_get_code(f, *args)
    src = "\n".join(code)
    return f, out, src, src.count("async_compile.cpp_pybinding(")


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


#: Prelude of a script that compiles Triton kernels for sm_90 (H100/H200) with the ptxas in
#: the Triton wheel: ``usage(fn, sig, consts)`` -> ``"REG:n LOCAL:m"`` of the compiled kernel.
SM90_PRELUDE = """
import os, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def usage(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    path = tempfile.mktemp(suffix=".cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    use = subprocess.run([os.path.join(ptxas_dir, "cuobjdump"), "--dump-resource-usage", path],
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in use.splitlines() if "REG:" in l).split()
    return f"{line[0]} {line[3]}"
"""


def assert_sm90_without_spills(script: str, n: int) -> list[str]:
    """Run ``SM90_PRELUDE + script`` (which prints one line per compiled kernel, ending in
    ``usage(...)``) in a fresh Python; ``n`` lines, none using local memory (register
    spills would turn the kernel's streams into local-memory traffic). Skips where the
    Triton wheel ships no NVIDIA toolchain."""
    import triton

    if not os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    ):
        pytest.skip("this Triton wheel ships no NVIDIA toolchain (ptxas, cuobjdump)")
    lines = run_isolated(SM90_PRELUDE + script).splitlines()
    assert len(lines) == n, lines
    for line in lines:
        assert line.endswith("LOCAL:0"), line
    return lines
