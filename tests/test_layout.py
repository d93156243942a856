"""The package layout: each concept has one home, imports only go down the layers, no
import cycles, and the public imports work. No engine is started."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: home -> the homes it may import (besides itself). ``roast_vllm`` is the public facade
#: (``roast_vllm/__init__.py``); ``vector`` and ``envs`` are the base every layer uses.
ALLOWED = {
    "vector": set(),
    "envs": set(),
    "kernels": set(),
    "engine": {"kernels", "vector", "envs"},
    "roast_vllm": {"engine", "vector"},
    "tasks": {"vector", "envs"},
    "runtime": {"roast_vllm", "engine", "tasks", "vector", "envs"},
    "methods": {"roast_vllm", "runtime", "engine", "kernels", "tasks", "vector", "envs"},
    "cli": {"roast_vllm", "methods", "runtime", "engine", "kernels", "tasks", "vector", "envs"},
}
COMMAND_GROUPS = ("model", "vectors", "generate", "serve", "roast", "fusion", "concept")


def _modules() -> dict[str, Path]:
    mods = {}
    files = [*(ROOT / "roast_vllm").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    for f in files:
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":  # installed as roast_vllm.kernels
            parts = ["roast_vllm", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (lazy imports too)."""
    out = {}
    for m, f in mods.items():
        got = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("roast_vllm"):
                for a in n.names:
                    sub = f"{n.module}.{a.name}"
                    got.add(sub if sub in mods else n.module)
            elif isinstance(n, ast.Import):
                got |= {a.name for a in n.names if a.name.startswith("roast_vllm")}
        out[m] = {g for g in got if g in mods and g != m}
    return out


def _home(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "roast_vllm"


MODS = _modules()
IMPORTS = _imports(MODS)


def test_every_module_has_a_home():
    assert {_home(m) for m in MODS} <= set(ALLOWED)


@pytest.mark.parametrize("home", list(ALLOWED))
def test_imports_only_go_down_the_layers(home):
    bad = sorted(
        (m, i)
        for m, imps in IMPORTS.items()
        if _home(m) == home
        for i in imps
        if _home(i) != home and _home(i) not in ALLOWED[home]
    )
    assert not bad, f"{home} may import only {sorted(ALLOWED[home])}: {bad}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import (lazy ones included)."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in IMPORTS[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in IMPORTS:
        if v not in index:
            visit(v)
    assert not cycles


def test_command_modules_do_not_import_each_other():
    for group in COMMAND_GROUPS:
        cli_imports = {i for i in IMPORTS[f"roast_vllm.cli.{group}"] if _home(i) == "cli"}
        assert cli_imports <= {"roast_vllm.cli.common"}, (group, cli_imports)


def test_the_cli_knows_every_command_group():
    from roast_vllm import cli

    assert set(cli.GROUPS) == set(COMMAND_GROUPS)
    on_disk = {p.stem for p in (ROOT / "roast_vllm" / "cli").glob("*.py")}
    assert on_disk == {*COMMAND_GROUPS, "__init__", "__main__", "common", "demo"}


def test_public_imports():
    import roast_vllm
    from roast_vllm import SITES, SteeringVector, SteeringVectorError  # noqa: F401

    for name in roast_vllm.__all__:
        assert getattr(roast_vllm, name) is not None, name
    for qualname in (
        "roast_vllm.engine.tracker:SteeringBatchTracker",
        "roast_vllm.engine.scheduler:SteeringScheduler",
        "roast_vllm.engine.worker:SteeringWorkerExtension",
        "roast_vllm.engine.plugin:register",
        "roast_vllm.cli:main",
    ):
        module, _, attr = qualname.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), qualname


def test_kernels_are_callable_by_name():
    """``roast_vllm.kernels.grouped_css`` / ``.steer_apply`` / ``.steer_mlp_act`` are the
    ops (matching their references); the modules stay importable by full name."""
    import roast_vllm.kernels as K
    from roast_vllm.kernels.grouped_css import grouped_css_ref
    from roast_vllm.kernels.steer_apply import steer_apply_ref
    from roast_vllm.kernels.steer_mlp_act import steer_mlp_act_ref

    g = torch.Generator().manual_seed(0)
    D, w, grp = torch.randn(2, 9, 16, generator=g), torch.rand(9, generator=g) + 0.5, torch.arange(9) // 3
    torch.testing.assert_close(K.grouped_css(D, w, grp, mode="l2"), grouped_css_ref(D, w, grp, "l2"))
    h, table = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)
    slot, scale = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0.0, 2.0, -1.0])
    got = K.steer_apply(h.clone(), table, slot, scale)
    want = steer_apply_ref(h.clone(), table, slot, scale)
    assert torch.equal(got, want) and not torch.equal(got, h)
    act, up = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    got = K.steer_mlp_act(act.clone(), up, table, slot, scale)
    # the CPU rows path fuses the multiply-add (addcmul_): equal within fp32 rounding
    torch.testing.assert_close(got, steer_mlp_act_ref(act.clone(), up, table, slot, scale))
    assert not torch.allclose(got, act)
    assert importlib.import_module("roast_vllm.kernels.grouped_css").grouped_css is K.grouped_css


def test_the_command_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "roast_vllm.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for command in ("prepare-model", "caa", "generate", "serve", "rollout", "estimate", "eval"):
        assert command in r.stdout
