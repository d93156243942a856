"""The command line, without an engine: argument parsing, prompt files, `caa`, and the
`vllm serve` command that `roast-vllm serve` builds."""

import json
import subprocess

import pytest
import torch
from conftest import roast_cli

from roast_vllm import SteeringVector
from roast_vllm.cli import main
from roast_vllm.cli.common import parse_layers, read_prompts


def test_layers_syntax():
    assert parse_layers("3") == [3]
    assert parse_layers("1,4-6, 9") == [1, 4, 5, 6, 9]
    assert parse_layers(None) is None


def test_read_prompts(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"question": "y"}\n')
    (tmp_path / "c.jsonl").write_text('{"other": 1}\n')
    (tmp_path / "d.jsonl").write_text("not json\n")
    assert read_prompts(str(tmp_path / "a.txt")) == ["one", "two"]
    assert read_prompts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    with pytest.raises(SystemExit, match="needs a 'prompt'"):
        read_prompts(str(tmp_path / "c.jsonl"))
    with pytest.raises(SystemExit, match="not JSON"):
        read_prompts(str(tmp_path / "d.jsonl"))
    with pytest.raises(SystemExit, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_caa_builds_a_mean_difference_vector(model_dir, tmp_path):
    from roast_vllm.cli.demo import DATA
    from roast_vllm.methods.hf import capture_residual, load_hf

    out = tmp_path / "happy.safetensors"
    main(
        [
            "caa",
            "--model",
            model_dir,
            "--positive",
            str(DATA / "happy.txt"),
            "--negative",
            str(DATA / "sad.txt"),
            "--layers",
            "6-8",
            "--out",
            str(out),
        ]
    )
    v = SteeringVector.load(out)
    assert v.layers == [6, 7, 8] and v.method == "caa" and v.hidden_size == 576 and v.num_layers == 30
    model, tok = load_hf(model_dir, dtype=torch.float32)
    pos = DATA.joinpath("happy.txt").read_text().splitlines()[:3]
    neg = DATA.joinpath("sad.txt").read_text().splitlines()[:3]
    # the CLI's vector is exactly mean(h+) - mean(h-) of the captured stream
    hp = capture_residual(
        model, tok, DATA.joinpath("happy.txt").read_text().splitlines(), [7], reduce="mean", progress=False
    )
    hn = capture_residual(
        model, tok, DATA.joinpath("sad.txt").read_text().splitlines(), [7], reduce="mean", progress=False
    )
    torch.testing.assert_close(v.directions[7], (hp.mean(1) - hn.mean(1))[0])
    # and it points from sad to happy text on held-in examples
    a = capture_residual(model, tok, pos, [7], reduce="mean", progress=False)[0] @ v.directions[7]
    b = capture_residual(model, tok, neg, [7], reduce="mean", progress=False)[0] @ v.directions[7]
    assert float(a.min()) > float(b.max())


def test_serve_dry_run_prints_the_vllm_command(model_dir, tmp_path):
    vec = SteeringVector.random(30, 576).save(tmp_path / "v.safetensors")
    r = subprocess.run(
        roast_cli("serve", "--model", model_dir, "--vector", f"v={vec}", "--dry-run", "--", "--port", "8123"),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    for piece in ("--additional-config", '"roast"', f'"v": "{vec}"', "--port 8123"):
        assert piece in line, piece
    for stale in ("--scheduler-cls", "--logits-processors", "ROAST_VLLM_CONFIG="):
        assert stale not in line, stale  # the plugin switches these on itself now
    bad = subprocess.run(
        roast_cli("serve", "--model", model_dir, "--vector", "oops", "--dry-run"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "NAME=FILE" in bad.stderr + bad.stdout


def test_config_json_roundtrip():
    from roast_vllm.engine.config import RoastConfig

    c = RoastConfig(max_steering_slots=8, vectors={"a": "/x.safetensors"}, num_layers=30)
    assert RoastConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown roast config keys"):
        RoastConfig.from_dict({"slots": 3})
    with pytest.raises(ValueError, match=">= 1"):
        RoastConfig(max_steering_slots=0)


@pytest.mark.engine
def test_fusion_references_search_eval(model_dir, tmp_path):
    """`roast-vllm fusion references`, `search` and `eval` on 4 TruthfulQA questions
    (part a: 1, part b: 3), in-process: a reference file with provenance, one searched
    entry per prompt, trials in the journal given by --storage, and the evaluation's
    table, CSV and PNG with skip_first tuned on part a (three engine starts: CI time)."""

    from roast_vllm import envs
    from roast_vllm.methods.fusion import ReferenceSet

    data = str(envs.data_dir() / "truthfulqa_dev.csv")
    common = ["--data", data, "--limit", "4", "--model", model_dir, "--workers", "0", "--quiet"]
    eng = ["--max-model-len", "1024", "--kv-cache-gib", "1", "--dtype", "float32"]
    refs_path = tmp_path / "refs.safetensors"
    main(["fusion", "references", *common, "--explain-tokens", "12", "--out", str(refs_path), *eng])
    refs = ReferenceSet.load(refs_path)
    assert len(refs.ids) == 4 and refs.vectors.shape == (4, 30, 576)
    assert refs.provenance["data_sha256"] and len(refs.provenance["explanations"]) == 4
    out, journal = tmp_path / "search.json", tmp_path / "search.journal"
    search = ["fusion", "search", *common, "--references", str(refs_path), "--trials", "2"]
    search += ["--max-tokens", "6", "--out", str(out), "--storage", str(journal), *eng]
    main(search)
    best = json.loads(out.read_text())["best"]
    assert sorted(best) == sorted(refs.ids) and all(b["trials"] == 2 for b in best.values())
    # the journal holds every trial (a rerun resumes from it: tests/test_fusion_search.py)
    assert journal.stat().st_size > 0

    ev = tmp_path / "eval"
    main(
        ["fusion", "eval", *common, "--references", str(refs_path), "--trials", "1"]
        + ["--max-tokens", "6", "--baseline-min-tokens", "4", "--out", str(ev), *eng]
    )
    doc = json.loads((ev / "eval.json").read_text())
    assert doc["settings"]["split"]["part"] == "b" and doc["settings"]["tune_split"] == "a"
    # skip_first tuned on part a (1 question): both settings tried per mode
    assert sorted((t["mode"], t["skip_first"]) for t in doc["tuning"]) == [
        ("full", False),
        ("full", True),
        ("segmented", False),
        ("segmented", True),
    ]
    assert all(t["n"] == 1 for t in doc["tuning"])
    rep = doc["report"]
    assert list(rep) == ["baseline", "baseline_min_tokens", "full", "segmented"]
    assert all(s["n"] == 3 for s in rep.values())
    assert all("vs_answering" in rep[m] and "vs_baseline" in rep[m] for m in ("full", "segmented"))
    per_q = {e["qid"]: e for e in doc["per_question"]}
    assert sorted(per_q) == [f"truthfulqa_mc-0000{i}" for i in (0, 1, 2)]
    for e in per_q.values():
        assert "params" not in e["baseline"] and isinstance(e["baseline"]["text"], str)
        assert e["baseline_min_tokens"]["tokens"] >= 4  # never silent
        for mode in ("full", "segmented"):
            r = e[mode]
            assert r["composite"] == pytest.approx(0.5 * r["overlap"] + 0.5 * r["true"])
            assert len(r["params"]) == (2 if mode == "full" else 6)
    rows = (ev / "eval.csv").read_text().splitlines()
    assert rows[0].startswith("condition,") and [r.split(",")[0] for r in rows[1:]] == list(rep)
    assert (ev / "eval.png").stat().st_size > 0


def test_convert_between_safetensors_and_gguf(tmp_path, capsys):
    """`roast-vllm convert`: ours -> llama.cpp GGUF -> ours, exact; layer 0 needs
    --drop-layer0; a bad output suffix and an mlp_act vector are refused with a reason."""
    v = SteeringVector.random(30, 576, layers=[2, 9], seed=5)
    src = v.save(tmp_path / "v.safetensors")
    main(["convert", str(src), str(tmp_path / "v.gguf")])
    main(["convert", str(tmp_path / "v.gguf"), str(tmp_path / "back.safetensors")])
    assert SteeringVector.load(tmp_path / "back.safetensors") == v
    assert "layers [2, 9]" in capsys.readouterr().out
    z = SteeringVector.random(30, 576, layers=[0, 1]).save(tmp_path / "z.safetensors")
    with pytest.raises(SystemExit):
        main(["convert", str(z), str(tmp_path / "z.gguf")])
    assert "--drop-layer0" in capsys.readouterr().err
    main(["convert", str(z), str(tmp_path / "z.gguf"), "--drop-layer0"])
    assert SteeringVector.load_gguf(tmp_path / "z.gguf").layers == [1]
    with pytest.raises(SystemExit):
        main(["convert", str(src), str(tmp_path / "v.bin")])
    m = SteeringVector.random(30, 1536, layers=[3], site="mlp_act").save(tmp_path / "m.safetensors")
    with pytest.raises(SystemExit):
        main(["convert", str(m), str(tmp_path / "m.gguf")])
    assert "residual" in capsys.readouterr().err
