"""Parsing and validating per-request steer_* keys (no engine)."""

import pytest

from roast_vllm.engine.spec import (
    SteeringRequestError,
    SteerSpec,
    VectorInfo,
    check_against,
    parse_steer_args,
)


def test_no_keys_is_none():
    assert parse_steer_args(None) is None
    assert parse_steer_args({}) is None
    assert parse_steer_args({"other": 1}) is None


def test_defaults_and_xargs_strings():
    s = parse_steer_args({"steer_vector": "v"})
    assert s == SteerSpec("v", 1.0, None, "all")
    # vllm serve's vllm_xargs send strings / lists
    s = parse_steer_args(
        {"steer_vector": "v", "steer_scale": "2.5", "steer_layers": "3, 1,3", "steer_positions": "generated"}
    )
    assert s == SteerSpec("v", 2.5, (1, 3), "generated")
    assert parse_steer_args({"steer_vector": "v", "steer_layers": [4, 2]}).layers == (2, 4)


@pytest.mark.parametrize(
    "args, match",
    [
        ({"steer_scale": 1.0}, "without steer_vector"),
        ({"steer_vector": ""}, "vector name"),
        ({"steer_vector": 3}, "vector name"),
        ({"steer_vector": "v", "steer_scale": float("nan")}, "finite"),
        ({"steer_vector": "v", "steer_scale": "inf"}, "finite"),
        ({"steer_vector": "v", "steer_scale": "big"}, "number"),
        ({"steer_vector": "v", "steer_layers": [1.5]}, "ints"),
        ({"steer_vector": "v", "steer_layers": [-1]}, ">= 0"),
        ({"steer_vector": "v", "steer_layers": []}, "empty"),
        ({"steer_vector": "v", "steer_positions": "middle"}, "not one of"),
        ({"steer_vector": "v", "steer_scael": 1}, "unknown steering keys"),
        ({"steer_vector": "v", "steer_scale": [1.0, "x", 2.0]}, "number"),
        ({"steer_vector": "v", "steer_scale": "1,inf,2"}, "finite"),
        ({"steer_vector": "v", "steer_scale": [1.0, 2e4, 1.0]}, "out of range"),
        ({"steer_vector": "v", "steer_scale": []}, "entries"),
        ({"steer_vector": "v", "steer_scale": [1.0] * 5000}, "entries"),
        ({"steer_vector": "v", "steer_mode": "mean"}, "not one of"),
        ({"steer_vector": "v", "steer_mode": "fusion", "steer_positions": "prompt"}, "every position"),
        ({"steer_vector": "v", "steer_mode": "fusion", "steer_start": 3}, "every position"),
        ({"steer_vector": "v", "steer_skip_first": True}, "fusion' only"),
        ({"steer_vector": "v", "steer_mode": "fusion", "steer_skip_first": "maybe"}, "true or false"),
    ],
    ids=[
        "no-vector",
        "empty-name",
        "int-name",
        "nan-scale",
        "inf-scale",
        "text-scale",
        "float-layer",
        "negative-layer",
        "empty-layers",
        "bad-positions",
        "typo-key",
        "text-in-scale-list",
        "inf-in-scale-string",
        "huge-layer-scale",
        "empty-scale-list",
        "scale-list-too-long",
        "unknown-mode",
        "fusion-with-positions",
        "fusion-with-start",
        "skip-first-without-fusion",
        "skip-first-not-bool",
    ],
)
def test_bad_args(args, match):
    with pytest.raises(SteeringRequestError, match=match):
        parse_steer_args(args)


def test_check_against_registry():
    vecs = {"v": VectorInfo(layers=(0, 1, 2), dim=576, site="residual")}
    check_against(SteerSpec("v", layers=(1,)), vecs, 30)
    with pytest.raises(SteeringRequestError, match="unknown steering vector 'w'"):
        check_against(SteerSpec("w"), vecs, 30)
    with pytest.raises(SteeringRequestError, match="out of range.*30 layers"):
        check_against(SteerSpec("v", layers=(31,)), vecs, 30)
    with pytest.raises(SteeringRequestError, match="steer_layers \\[5\\]: vector .v. has no direction"):
        check_against(SteerSpec("v", layers=(5,)), vecs, 30)


def test_per_layer_scales():
    """``steer_scale`` as 3 numbers (thirds of the layers) or one per layer, from a list
    or vllm_xargs' ``"a,b,c"`` string; checked against the model's layer count."""
    s = parse_steer_args({"steer_vector": "v", "steer_scale": "1, -0.5,2"})
    assert s.scale == (1.0, -0.5, 2.0) and s.max_abs_scale == 2.0
    assert parse_steer_args({"steer_vector": "v", "steer_scale": [3]}).scale == 3.0
    # 30 layers: 0-9, 10-19, 20-29; 32 layers: 0-10, 11-21, 22-31
    assert s.layer_scales(30) == [1.0] * 10 + [-0.5] * 10 + [2.0] * 10
    assert s.layer_scales(32) == [1.0] * 11 + [-0.5] * 11 + [2.0] * 10
    assert SteerSpec("v", 2.0).layer_scales(4) == [2.0] * 4
    per = SteerSpec("v", (0.0, 1.0, 2.0, 3.0))
    assert per.layer_scales(4) == [0.0, 1.0, 2.0, 3.0]
    vecs = {"v": VectorInfo(layers=(0, 1, 2, 3), dim=8, site="residual", max_abs=1.0)}
    check_against(per, vecs, 4)
    check_against(s, vecs, 4)
    with pytest.raises(SteeringRequestError, match="4 entries.*one per layer \\(30\\)"):
        check_against(per, vecs, 30)
    big = {"v": VectorInfo(layers=(0,), dim=8, site="residual", max_abs=2000.0)}
    check_against(SteerSpec("v", (1.0, 2.0, 1.0)), big, 3, None, "float16")  # adds <= 4096
    with pytest.raises(SteeringRequestError, match="steer_scale=3 too large"):  # the largest entry counts
        check_against(SteerSpec("v", (1.0, 3.0, 1.0)), big, 3, None, "float16")
    # distinct per-layer scales are distinct configurations (slot key and cache salt)
    assert s.slot_key != SteerSpec("v", (1.0, 2.0, -0.5)).slot_key
    assert s.cache_salt(5) != SteerSpec("v", (1.0, 2.0, -0.5)).cache_salt(5)


@pytest.mark.parametrize(
    "positions, plen, expected",
    [
        ("all", 5, (0, 1 << 62)),
        ("prompt", 5, (0, 5)),
        ("generated", 5, (5, 1 << 62)),
        ("last_prompt_and_generated", 5, (4, 1 << 62)),
    ],
)
def test_token_range(positions, plen, expected):
    assert SteerSpec("v", positions=positions).token_range(plen) == expected


def test_cache_salt_distinguishes_configs():
    a = SteerSpec("v", 1.0, None, "all").cache_salt(10)
    assert a == SteerSpec("v", 1.0, None, "all").cache_salt(10)
    assert a != SteerSpec("v", 2.0, None, "all").cache_salt(10)
    assert a != SteerSpec("v", 1.0, (1,), "all").cache_salt(10)
    assert a != SteerSpec("v", 1.0, None, "prompt").cache_salt(10)
    assert a != SteerSpec("w", 1.0, None, "all").cache_salt(10)
    # two versions of one name are two configurations
    assert SteerSpec("v", digest="0" * 16).cache_salt(10) != SteerSpec("v", digest="1" * 16).cache_salt(10)


@pytest.mark.parametrize("positions", ["prompt", "generated", "last_prompt_and_generated"])
def test_cache_salt_carries_the_absolute_steered_range(positions):
    """Scopes are relative to each request's prompt length: a chat's turn 2 (turn 1's
    prompt and reply in its prompt) must not share KV blocks with turn 1, which steered
    other absolute positions. Scope "all" steers the same positions whatever the prompt."""
    spec = SteerSpec("v", 1.0, None, positions)
    assert spec.cache_salt(12) != spec.cache_salt(40)
    assert SteerSpec("v").cache_salt(12) == SteerSpec("v").cache_salt(40)
    assert SteerSpec("v", start=5).cache_salt(12) == SteerSpec("v", start=5).cache_salt(40)


def test_steer_start_overrides_the_scope():
    s = parse_steer_args({"steer_vector": "v", "steer_start": "7"})
    assert s.start == 7 and s.token_range(20) == (7, 1 << 62)
    assert s.cache_salt(20) != parse_steer_args({"steer_vector": "v"}).cache_salt(20)
    for bad in (-1, 1.5, "x", True):
        with pytest.raises(SteeringRequestError, match="steer_start"):
            parse_steer_args({"steer_vector": "v", "steer_start": bad})
    with pytest.raises(SteeringRequestError, match="not both"):
        parse_steer_args({"steer_vector": "v", "steer_start": 3, "steer_positions": "all"})


def test_fusion_mode():
    """``steer_mode="fusion"``: every position (position 0 too unless ``steer_skip_first``),
    a configuration apart from the additive one with the same vector, scale and layers
    (slot key and cache salt), a residual reference, and only where the engine has it."""
    s = parse_steer_args({"steer_vector": "v", "steer_mode": "fusion", "steer_scale": "0.2,0.5,0.1"})
    assert s == SteerSpec("v", (0.2, 0.5, 0.1), mode="fusion")
    assert s.token_range(7) == (0, 1 << 62)
    k = parse_steer_args({"steer_vector": "v", "steer_mode": "fusion", "steer_skip_first": "true"})
    assert k.skip_first and k.token_range(7) == (1, 1 << 62)
    add = SteerSpec("v", (0.2, 0.5, 0.1))
    assert s.slot_key != add.slot_key and s.cache_salt(7) != add.cache_salt(7)
    assert add.cache_salt(7) == SteerSpec("v", (0.2, 0.5, 0.1), mode="add").cache_salt(7)
    vecs = {
        "v": VectorInfo(layers=(0, 1, 2), dim=8, site="residual", max_abs=1.0),
        "m": VectorInfo(layers=(0, 1, 2), dim=32, site="mlp_act", max_abs=1.0),
    }
    check_against(s, vecs, 3)
    with pytest.raises(SteeringRequestError, match="residual-stream reference"):
        check_against(SteerSpec("m", 1.0, mode="fusion"), vecs, 3)
    with pytest.raises(SteeringRequestError, match="Fusion Steering is off"):
        check_against(s, vecs, 3, fusion=False)


def test_capture_from_key():
    from roast_vllm.engine.spec import check_internal_keys

    check_internal_keys({"roast_capture": "c", "roast_capture_from": 3}, capture_allowed=True)
    with pytest.raises(SteeringRequestError, match="needs roast_capture"):
        check_internal_keys({"roast_capture_from": 3}, capture_allowed=True)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(SteeringRequestError, match="prompt position"):
            check_internal_keys({"roast_capture": "c", "roast_capture_from": bad}, capture_allowed=True)


# ---------------------------------------------------------------- multi-vector requests
_COMBO = [{"name": "a", "scale": 0.5}, {"name": "b", "scale": -0.3, "layers": [3, 4, 5, 9]}]


@pytest.mark.parametrize(
    "form",
    [
        _COMBO,
        "a:0.5,b:-0.3@3-5+9",
        " a:0.5 , b:-0.3@3-5+9 ",
        ["a:0.5", "b:-0.3@3-5+9"],  # vllm_xargs: a list of strings
        '[{"name": "a", "scale": 0.5}, {"name": "b", "scale": "-0.3", "layers": "3,4,5,9"}]',
    ],
    ids=["objects", "compact", "compact-spaces", "strings", "json-string"],
)
def test_steer_vectors_forms_parse_to_one_combination(form):
    spec = parse_steer_args({"steer_vectors": form, "steer_positions": "generated"})
    assert [(t.vector, t.scale, t.layers) for t in spec.terms] == [
        ("a", 0.5, None),
        ("b", -0.3, (3, 4, 5, 9)),
    ]
    assert spec.positions == "generated" and spec.scale == 1.0 and spec.layers is None
    # the compact label reads back to the same combination: one slot key, one cache salt
    again = parse_steer_args({"steer_vectors": spec.vector, "steer_positions": "generated"})
    assert again.slot_key == spec.slot_key and again.cache_salt(7) == spec.cache_salt(7)


def test_combinations_differ_by_any_term():
    base = parse_steer_args({"steer_vectors": "a:0.5,b:-0.3"})
    for other in ("a:0.5,b:-0.31", "a:0.5,b:-0.3@1", "a:0.5,c:-0.3", "b:-0.3,a:0.5", "a:0.5"):
        o = parse_steer_args({"steer_vectors": other})
        assert o.slot_key != base.slot_key and o.cache_salt(5) != base.cache_salt(5), other


def test_one_entry_steer_vectors_is_the_single_vector_request():
    one = parse_steer_args({"steer_vectors": [{"name": "a", "scale": 2.0, "layers": [1, 2]}]})
    single = parse_steer_args({"steer_vector": "a", "steer_scale": 2.0, "steer_layers": [1, 2]})
    assert one == single and one.slot_key == single.slot_key


@pytest.mark.parametrize(
    "args, match",
    [
        ({"steer_vectors": "a:0.5,b:1", "steer_vector": "a"}, "steer_vectors or steer_vector"),
        ({"steer_vectors": "a:0.5,b:1", "steer_scale": 2}, "steer_vectors or steer_scale"),
        ({"steer_vectors": "a:0.5,b:1", "steer_layers": [1]}, "steer_vectors or steer_layers"),
        ({"steer_vectors": "a:0.5,b:1", "steer_mode": "fusion"}, "additive only"),
        ({"steer_vectors": []}, "must list 1..16"),
        ({"steer_vectors": ",".join(f"v{i}" for i in range(17))}, "must list 1..16"),
        ({"steer_vectors": "a:0.5,b:x"}, r"steer_vectors\[1\] scale must be a number"),
        ({"steer_vectors": "a:0.5,b:inf"}, "finite"),
        ({"steer_vectors": "a:0.5,b:1@5-3"}, "lo <= hi"),
        ({"steer_vectors": "a:0.5,b:1@x"}, "non-negative ints"),
        ({"steer_vectors": [{"name": "a"}, {"vector": "b"}]}, r"steer_vectors\[1\]: unknown keys"),
        ({"steer_vectors": [{"name": "a"}, 3]}, r"steer_vectors\[1\] must be"),
        ({"steer_vectors": "[{bad json"}, "not valid JSON"),
        ({"steer_vectors": "a,:2"}, "vector name must be"),
        ({"steer_vectors": "a,b", "roast_vector_digest": "0123456789abcdef"}, "front end"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_steer_vectors(args, match):
    with pytest.raises(SteeringRequestError, match=match):
        parse_steer_args(args)


def test_combination_digests_one_per_vector():
    d = "0123456789abcdef,fedcba9876543210"
    spec = parse_steer_args({"steer_vectors": "a,b", "roast_vector_digest": d})
    assert spec.digests == ("0123456789abcdef", "fedcba9876543210")


def test_check_against_checks_every_term_and_the_sum():
    vecs = {
        "a": VectorInfo(layers=(0, 1, 2), dim=576, site="residual", max_abs=1.0),
        "m": VectorInfo(layers=(1,), dim=1536, site="mlp_act", max_abs=2.0),
    }
    check_against(parse_steer_args({"steer_vectors": "a:0.5,m:-1@1"}), vecs, 30)  # both sites: fine
    with pytest.raises(
        SteeringRequestError, match=r"steer_vectors\[1\] \('w'\): .*unknown steering vector 'w'"
    ):
        check_against(parse_steer_args({"steer_vectors": "a:0.5,w:1"}), vecs, 30)
    with pytest.raises(SteeringRequestError, match=r"steer_vectors\[1\] \('m'\): steer_layers \[2\]"):
        check_against(parse_steer_args({"steer_vectors": "a:0.5,m:1@2"}), vecs, 30)
    # each term alone within fp16's bound, together not
    with pytest.raises(SteeringRequestError, match="together would add up to 6e\\+03"):
        check_against(parse_steer_args({"steer_vectors": "a:3000,m:1500"}), vecs, 30, dtype="float16")
