"""``roast-vllm rollout``: bulk on-distribution rollouts, sharded, checkpointed, on Ray.

Questions are cut into shards of ``shard_size``; every finished shard is written
atomically to ``<out>.shards/shard-NNNNN.jsonl`` by the driver (the single writer), so a
run that stops for any reason (Ctrl-C, a killed worker, a lost node) resumes by re-running
the same command: finished shards are skipped, unfinished ones are run once. A manifest
records the settings; resuming with different settings is refused rather than mixed.
When all shards are done they are merged, in question order, into ``out`` (``.jsonl`` or
``.parquet``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from roast_vllm.runtime.pool import EngineOptions, PoolOptions, WorkerPool, open_pool
from roast_vllm.tasks import data_hash, get_task, select

MANIFEST = "manifest.json"


@dataclass
class RolloutConfig:
    """What to sample (the manifest: a resumed run must match it)."""

    task: str
    data: str
    n: int = 8
    """Samples per question."""
    temperature: float = 0.8
    top_p: float = 0.9
    max_tokens: int | None = None
    """Tokens per response (None: the task's default)."""
    seed: int = 42
    """Base of the per-sample seeds (``jobs.sample_seed``)."""
    shard_size: int = 16
    """Questions per shard (the unit of checkpointing and of work per actor call)."""
    limit: int | None = None
    split: str = "all"
    split_fraction: float = 0.5
    split_seed: int = 0
    model: str | None = None
    vector: str | None = None
    """Steer the rollouts with this vector file (None: unsteered)."""
    scale: float = 1.0
    layers: list[int] | None = None
    positions: str = "all"
    data_sha256: str = field(default="", compare=False)
    vector_sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name, lo in (("n", 1), ("shard_size", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def shard_dir(out: str | Path) -> Path:
    return Path(str(out) + ".shards")


def _shard_path(d: Path, i: int) -> Path:
    return d / f"shard-{i:05d}.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a shard file is complete or absent


def _check_manifest(d: Path, cfg: RolloutConfig, overwrite: bool) -> None:
    mine = asdict(cfg)
    m = d / MANIFEST
    if m.exists() and not overwrite:
        theirs = json.loads(m.read_text())
        # a manifest from an older version lacks newer fields: those had their defaults
        defaults = asdict(RolloutConfig(task=cfg.task, data=cfg.data))
        diff = {
            k: (theirs.get(k, defaults[k]), v) for k, v in mine.items() if theirs.get(k, defaults[k]) != v
        }
        if diff:
            raise SystemExit(
                f"error: {d} holds shards of a run with other settings "
                f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "rerun with the same settings to resume, or pass --overwrite / another --out"
            )
        return
    if overwrite and d.exists():
        for p in d.glob("shard-*.jsonl"):
            p.unlink()
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(m, json.dumps(mine, indent=1))


def run_rollouts(
    cfg: RolloutConfig,
    out: str | Path,
    engine: EngineOptions | None = None,
    pool: PoolOptions | WorkerPool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard=None,
) -> Path:
    """Sample, verify and checkpoint; returns the merged output file.

    ``pool``: where to run (``PoolOptions``), or an open ``WorkerPool`` to reuse.
    ``on_shard(index, pool)`` is called after each shard is saved.
    """
    from tqdm import tqdm

    task = get_task(cfg.task)
    cfg.data_sha256 = data_hash(cfg.data)
    steer = None
    if cfg.vector is not None:
        from roast_vllm.vector import SteeringVector

        vec_bytes = SteeringVector.load(cfg.vector).to_bytes()
        cfg.vector_sha256 = data_hash(cfg.vector)
        steer = {"steer_vector": "rollout", "steer_scale": cfg.scale, "steer_positions": cfg.positions}
        if cfg.layers is not None:
            steer["steer_layers"] = list(cfg.layers)
    questions = select(task, cfg.data, cfg.split, cfg.split_fraction, cfg.split_seed, cfg.limit)
    if not questions:
        raise SystemExit(
            f"error: no questions selected from {cfg.data} (split={cfg.split}, limit={cfg.limit})"
        )
    max_tokens = cfg.max_tokens or task.default_max_tokens
    out = Path(out)
    d = shard_dir(out)
    _check_manifest(d, cfg, overwrite)
    shards = [questions[i : i + cfg.shard_size] for i in range(0, len(questions), cfg.shard_size)]
    todo = [i for i in range(len(shards)) if not _shard_path(d, i).exists()]
    done_q = sum(len(shards[i]) for i in range(len(shards)) if i not in set(todo))
    bar = tqdm(
        total=len(questions), initial=done_q, desc=f"rollouts {cfg.task}", unit="q", disable=not progress
    )
    stats = {"correct": 0, "total": 0}
    if todo:
        engine = engine or EngineOptions(model=cfg.model)
        jobs = [
            (
                i,
                "sample",
                (cfg.task, shards[i], cfg.n, cfg.temperature, cfg.top_p, max_tokens, cfg.seed, steer),
            )
            for i in todo
        ]
        try:
            with open_pool(engine, pool) as wp:
                if steer is not None:
                    wp.broadcast("ensure_vector", "rollout", vec_bytes)
                for i, records in wp.run(jobs):
                    _write_atomic(_shard_path(d, i), "".join(json.dumps(r) + "\n" for r in records))
                    stats["correct"] += sum(bool(r["correct"]) for r in records)
                    stats["total"] += len(records)
                    if task.has_verifier:
                        bar.set_postfix(acc=f"{stats['correct'] / max(stats['total'], 1):.3f}")
                    bar.update(len(shards[i]))
                    if on_shard is not None:
                        on_shard(i, wp)
        except KeyboardInterrupt:
            bar.close()
            left = sum(not _shard_path(d, i).exists() for i in range(len(shards)))
            raise SystemExit(
                f"interrupted: {len(shards) - left}/{len(shards)} shards are saved in {d}; "
                "rerun the same command to resume"
            ) from None
    bar.close()
    return merge(d, len(shards), out)


def read_shards(d: Path, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        with _shard_path(d, i).open() as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def merge(d: Path, count: int, out: Path) -> Path:
    rows = read_shards(d, count)
    write_records(rows, out)
    return out


def write_records(rows: list[dict], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pandas as pd

        tmp = out.with_suffix(".parquet.tmp")
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, out)
    else:
        _write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))


def read_records(path: str | Path) -> list[dict]:
    """Rollout records from a ``.jsonl`` or ``.parquet`` file."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: rollout file {p} does not exist (make it with `roast-vllm rollout`)")
    if p.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(p).to_dict("records")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {p}:{i}: not JSON ({e})") from None
    return rows


def manifest(out: str | Path) -> dict:
    m = shard_dir(out) / MANIFEST
    return json.loads(m.read_text()) if m.exists() else {}
