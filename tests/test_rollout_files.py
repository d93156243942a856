"""Rollout checkpoint files without an engine: manifest checks, formats, seeds."""

import json
import os
import subprocess
import sys

import pytest

from roast_vllm.envs import data_dir
from roast_vllm.runtime.jobs import sample_seed
from roast_vllm.runtime.rollout import RolloutConfig, _check_manifest, read_records, shard_dir, write_records

DATA = data_dir() / "truthfulqa_dev.csv"


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = RolloutConfig(task="truthfulqa_mc", data=str(DATA), n=4)
    _check_manifest(shard_dir(out), cfg, overwrite=False)
    (shard_dir(out) / "shard-00000.jsonl").write_text("{}\n")
    _check_manifest(shard_dir(out), RolloutConfig(task="truthfulqa_mc", data=str(DATA), n=4), overwrite=False)
    with pytest.raises(SystemExit, match=r"n: 4 -> 8.*--overwrite"):
        _check_manifest(
            shard_dir(out), RolloutConfig(task="truthfulqa_mc", data=str(DATA), n=8), overwrite=False
        )
    # --overwrite discards the old shards and records the new settings
    _check_manifest(shard_dir(out), RolloutConfig(task="truthfulqa_mc", data=str(DATA), n=8), overwrite=True)
    assert not list(shard_dir(out).glob("shard-*.jsonl"))
    assert json.loads((shard_dir(out) / "manifest.json").read_text())["n"] == 8


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_records_round_trip(tmp_path, suffix):
    rows = [
        {"qid": "q1", "sample": 0, "response": "A. yes\nno", "correct": True, "completion_tokens": 3},
        {"qid": "q2", "sample": 1, "response": "", "correct": False, "completion_tokens": 0},
    ]
    p = tmp_path / f"r{suffix}"
    write_records(rows, p)
    back = read_records(p)
    assert [{k: (bool(v) if k == "correct" else v) for k, v in r.items()} for r in back] == rows


def test_bad_settings_and_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 1"):
        RolloutConfig(task="gsm8k", data="x", n=0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(task="gsm8k", data="x", top_p=0)
    with pytest.raises(SystemExit, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"qid": 1}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")


def test_sample_seeds_depend_only_on_seed_question_and_index():
    # the same in another interpreter with another hash seed (another worker, another run)
    code = "from roast_vllm.runtime.jobs import sample_seed; print(sample_seed(42, 'q1', 0))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(other.stdout.split()[-1]) == sample_seed(42, "q1", 0)
    seeds = {sample_seed(42, f"q{i}", j) for i in range(50) for j in range(8)}
    assert len(seeds) == 400
    assert sample_seed(43, "q1", 0) != sample_seed(42, "q1", 0)


def test_prompts_task_for_plain_bulk_rollouts(tmp_path):
    from roast_vllm.tasks import get_task

    t = get_task("prompts")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "Tell me a joke.", "id": "joke"}\n\n{"prompt": "Write a haiku."}\n')
    qs = t.load(p)
    assert [q.qid for q in qs] == ["joke", "prompts-00001"]
    assert qs[1].messages == [{"role": "user", "content": "Write a haiku."}]
    assert not t.has_verifier and t.verify(qs[0], "ha") is None
    p.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        t.load(p)
    p.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="prompt"):
        t.load(p)
