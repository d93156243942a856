"""vLLM engine arguments on every command (parsed by vLLM's own parser), the CPU dtype
rule and bounded engine steps. No engine is started."""

from __future__ import annotations

import json
import shlex

import pytest

from roast_vllm.cli import demo, main, parse_args
from roast_vllm.cli.serve import serve_command
from roast_vllm.engine import args as ea
from roast_vllm.runtime.pool import EngineOptions

HF = {"rope_theta": 10000.0, "max_window_layers": 4}
VLLM = [
    "--dtype",
    "float32",
    "--tensor-parallel-size",
    "2",
    "--gpu-memory-utilization",
    "0.5",
    "--max-num-batched-tokens",
    "1024",
    "--quantization",
    "fp8",
    "--hf-overrides",
    json.dumps(HF),
]
EXPECTED = {
    "dtype": "float32",
    "tensor_parallel_size": 2,
    "gpu_memory_utilization": 0.5,
    "max_num_batched_tokens": 1024,
    "quantization": "fp8",
    "hf_overrides": HF,
}
DATA = ["--task", "gsm8k", "--data", "d.jsonl"]
COMMANDS = {
    "generate": ["generate", "Hello there"],
    "rollout": ["rollout", *DATA, "--out", "r.jsonl"],
    "estimate": ["estimate", *DATA, "--rollouts", "r.jsonl", "--out", "v.safetensors"],
    "eval": ["eval", *DATA, "--out", "e.json"],
    "serve": ["serve", "--max-steering-slots", "8"],
    "demo": [],
}


def _parse(command: str, argv: list[str]):
    parse = demo.parse_args if command == "demo" else parse_args
    return parse([*COMMANDS[command], *argv])


# ------------------------------------------------------------------ passthrough
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_passes_vllm_options_through(command):
    for argv in (VLLM, ["--", *VLLM]):  # among the command's options, or after --
        args = _parse(command, argv)
        assert args.engine_kwargs == EXPECTED
        # the exact types vllm.LLM / EngineArgs take (JSON -> dict, not a string)
        assert {k: type(v) for k, v in args.engine_kwargs.items()} == {
            k: type(v) for k, v in EXPECTED.items()
        }
        assert args.engine_argv == VLLM
    # the command's own options are still its own
    if command == "generate":
        assert args.prompt == ["Hello there"]
    if command == "serve":
        assert args.max_steering_slots == 8


@pytest.mark.parametrize("command", COMMANDS)
def test_vllm_defaults_are_not_passed(command):
    args = _parse(command, [])
    assert args.engine_kwargs == {} and args.engine_argv == []
    # an explicit value is passed even when it equals vLLM's default
    assert _parse(command, ["--dtype", "auto"]).engine_kwargs == {"dtype": "auto"}


def test_parsed_options_build_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    kw = parse_args([*COMMANDS["rollout"], *VLLM, "-O3", "--max_num_seqs", "8"]).engine_kwargs
    e = EngineArgs(model="m", **kw)
    assert (e.dtype, e.tensor_parallel_size, e.max_num_seqs, e.hf_overrides) == ("float32", 2, 8, HF)


def test_vllm_spellings_and_positionals():
    args = parse_args(
        ["generate", "--enforce-eager", "A prompt", "-tp", "2", "--max_num_seqs", "8", "--scale", "-2",
         "--hf-overrides.rope_theta", "5", "-O3", "--max-tokens=5"]
    )  # fmt: skip
    assert args.prompt == ["A prompt"] and args.scale == -2.0 and args.max_tokens == 5
    assert args.engine_kwargs == {
        "enforce_eager": True,
        "tensor_parallel_size": 2,
        "max_num_seqs": 8,
        "hf_overrides": {"rope_theta": 5},
        "optimization_level": "3",
    }


def test_shared_names_are_the_commands_before_dashdash_and_vllms_after():
    args = parse_args([*COMMANDS["rollout"], "--seed", "7", "--max-model-len", "1024"])
    assert (args.seed, args.max_model_len, args.engine_kwargs) == (7, 1024, {})
    args = parse_args([*COMMANDS["rollout"], "--seed", "7", "--", "--seed", "3", "--max-model-len", "1k"])
    assert args.seed == 7 and args.engine_kwargs == {"seed": 3, "max_model_len": 1000}


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_or_bad_option_is_a_clear_error(command, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(command, ["--no-such-option", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized argument --no-such-option: neither" in err
    with pytest.raises(SystemExit):
        _parse(command, ["--dtype", "fp33"])
    assert "argument --dtype: invalid choice: 'fp33'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(command, ["--", "--model", "other"])
    assert "own --model" in capsys.readouterr().err


def test_commands_without_an_engine_refuse_vllm_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["caa", "--positive", "a", "--negative", "b", "--out", "c", "--dtype", "float32"])
    assert "--dtype" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_vllm_options_are_accepted(command, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(command, ["--help"])
    assert e.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # help text is wrapped anywhere
    assert ("every`vllmserve`option" if command == "serve" else "everyvLLMengineargument") in out
    assert "--help=KEYWORD" in out and "float32elsewhere" in out


def test_help_keyword_shows_vllms_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*COMMANDS["eval"], "--help=tensor-parallel"])
    assert e.value.code == 0
    assert "--tensor-parallel-size" in capsys.readouterr().out


# ------------------------------------------------------------------ CPU dtype
@pytest.mark.parametrize(
    "text, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n", False),
        ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", True),
        ("flags\t\t: fpu avx2 amx_tile amx_bf16\n", True),
        ("Features\t: fp asimd sve bf16\n", True),
        ("Features\t: fp asimd\n", False),
        ("model name\t: something\n", False),
    ],
)
def test_cpu_has_native_bf16(tmp_path, text, native):
    (tmp_path / "cpuinfo").write_text(text)
    assert ea.cpu_has_native_bf16(tmp_path / "cpuinfo") is native


def test_cpu_flags_unknown_means_no_bf16(tmp_path):
    assert ea.cpu_flags(tmp_path / "missing") is None
    assert ea.cpu_has_native_bf16(tmp_path / "missing") is False


def test_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(ea, "on_cpu", lambda: True)
    monkeypatch.setattr(ea, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "avx512f"})
    assert ea.default_dtype() == "float32"
    monkeypatch.setattr(ea, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "avx512_bf16"})
    assert ea.default_dtype() == "bfloat16"
    monkeypatch.setattr(ea, "on_cpu", lambda: False)  # GPUs keep vLLM's auto
    assert ea.default_dtype() is None
    assert ea.default_dtype(cpu=True) == "bfloat16"


# ------------------------------------------------------------------ bounded steps
def test_step_bounds_unseeded_cpu_chunks_prefill_in_bounded_steps():
    kw = ea.step_bounds({"max_model_len": 8192}, seeded=False, cpu=True)
    assert kw == {"max_model_len": 8192, "enable_chunked_prefill": True, "max_num_batched_tokens": 2048}
    kw = ea.step_bounds({"max_num_batched_tokens": 512}, seeded=False, cpu=True)
    assert kw["max_num_batched_tokens"] == 512 and kw["enable_chunked_prefill"] is True


def test_step_bounds_seeded_cpu_never_chunks_a_prompt():
    kw = ea.step_bounds({"max_model_len": 1024}, seeded=True, cpu=True)
    assert kw == {"max_model_len": 1024, "enable_chunked_prefill": False, "max_num_batched_tokens": 2048}
    # no context length given: capped at the step budget, so no prompt needs two steps
    kw = ea.step_bounds({"max_num_batched_tokens": 1024}, seeded=True, cpu=True)
    assert kw["max_model_len"] == 1024 and kw["enable_chunked_prefill"] is False
    # a longer context without a budget raises the budget to it
    assert ea.step_bounds({"max_model_len": 4096}, seeded=True, cpu=True)["max_num_batched_tokens"] == 4096
    with pytest.raises(ValueError, match="own seeds"):
        ea.step_bounds({"enable_chunked_prefill": True}, seeded=True, cpu=True)
    with pytest.raises(ValueError, match="max_model_len 2048 > max_num_batched_tokens 1024"):
        ea.step_bounds({"max_model_len": 2048, "max_num_batched_tokens": 1024}, seeded=True, cpu=True)


def test_step_bounds_maybe_seeded_defaults_safe_but_honours_a_choice():
    assert ea.step_bounds({}, seeded=None, cpu=True) == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 2048,
        "max_model_len": 2048,
    }
    kw = ea.step_bounds({"enable_chunked_prefill": True}, seeded=None, cpu=True)
    assert kw == {"enable_chunked_prefill": True, "max_num_batched_tokens": 2048}


def test_step_bounds_leave_gpus_to_vllm():
    kw = {"max_model_len": 4096, "dtype": "float16"}
    assert ea.step_bounds(kw, seeded=True, cpu=False) == kw


def test_engine_options_use_bounded_steps():
    kw = EngineOptions().llm_kwargs(cpu=True)  # seeded by default (rollouts)
    assert (kw["enable_chunked_prefill"], kw["max_num_batched_tokens"], kw["max_model_len"]) == (
        False,
        2048,
        2048,
    )
    kw = EngineOptions(seeded=False, max_model_len=4096).llm_kwargs(cpu=True)
    assert (kw["enable_chunked_prefill"], kw["max_num_batched_tokens"]) == (True, 2048)
    kw = EngineOptions().llm_kwargs(cpu=False)
    assert "enable_chunked_prefill" not in kw and "max_num_batched_tokens" not in kw
    # extra (vLLM options) wins over the fields, without a duplicate-keyword error
    kw = EngineOptions(extra={"max_num_seqs": 8, "seed": 5}).llm_kwargs(cpu=True)
    assert (kw["max_num_seqs"], kw["seed"]) == (8, 5)


def test_roast_commands_build_engine_options(monkeypatch):
    from roast_vllm.cli.common import engine_options as _engine

    monkeypatch.setattr(ea, "on_cpu", lambda: True)
    args = parse_args([*COMMANDS["rollout"], "--workers", "0", "--dtype", "float32", "--max-num-seqs", "8"])
    eng, pool = _engine(args, seeded=True)
    assert eng.seeded and eng.extra == {"dtype": "float32", "max_num_seqs": 8} and pool.workers == 0
    kw = eng.llm_kwargs(cpu=True)
    assert kw["dtype"] == "float32" and kw["max_num_seqs"] == 8 and kw["kv_cache_memory_bytes"] == 1 << 30
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 2048
    # vLLM's own KV-cache sizing replaces the default --kv-cache-gib ...
    eng, _ = _engine(parse_args([*COMMANDS["eval"], "--gpu-memory-utilization", "0.5"]))
    assert eng.kv_cache_gib is None and "kv_cache_memory_bytes" not in eng.llm_kwargs(cpu=True)
    # ... and both at once is refused
    with pytest.raises(ValueError, match="--kv-cache-gib and --gpu-memory-utilization"):
        _engine(parse_args([*COMMANDS["eval"], "--kv-cache-gib", "2", "--gpu-memory-utilization", "0.5"]))
    # seeded rollouts on CPU cannot chunk their prompts
    with pytest.raises(ValueError, match="own seeds"):
        _engine(parse_args([*COMMANDS["rollout"], "--enable-chunked-prefill"]), seeded=True)
    # estimate captures activations: eager only
    with pytest.raises(SystemExit, match="eager"):
        _engine(parse_args([*COMMANDS["estimate"], "--no-enforce-eager"]), compile_ok=False)


# ------------------------------------------------------------------ serve
def test_serve_command_includes_the_vllm_options(model_dir):
    cmd, env = serve_command(model_dir, {}, 8, [*VLLM, "--port", "8123"], cpu=True)
    line = shlex.join(cmd)
    for piece in (
        "--dtype float32",
        "--tensor-parallel-size 2",
        "--gpu-memory-utilization 0.5",
        "--max-num-batched-tokens 1024",
        "--quantization fp8",
        "--port 8123",
        # bounded steps (a server's clients may seed): no chunking, prompts fit one step
        "--no-enable-chunked-prefill",
        "--max-model-len 1024",
    ):
        assert piece in line, piece
    assert cmd.count("--dtype") == 1  # the user's, no default added
    # the stock command: the roast entry; the plugin adds the architecture, tracker,
    # scheduler and worker extension when vLLM builds its config (tests/test_plugin.py)
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {
        "roast": {"max_steering_slots": 8, "vectors": {}}
    }
    for flag in ("--scheduler-cls", "--worker-extension-cls", "--logits-processors"):
        assert flag not in cmd
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == HF  # the user's, as given
    # the registry API is a vLLM endpoint plugin: loaded only when VLLM_PLUGINS names it
    assert "roast_vllm" in env["VLLM_PLUGINS"].split(",") and set(env) == {"VLLM_PLUGINS"}


def test_plugins_env_keeps_other_plugins():
    from roast_vllm.cli.serve import plugins_env

    assert plugins_env("other,roast_vllm") == "other,roast_vllm"
    assert plugins_env("other") == "other,roast_vllm"
    # unset: every installed general plugin stays on (VLLM_PLUGINS is also their allowlist)
    assert "roast_vllm" in plugins_env(None).split(",")


def test_serve_command_defaults(model_dir, monkeypatch):
    monkeypatch.setattr(ea, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2"})
    cmd, _ = serve_command(model_dir, {}, 8, [], cpu=True)
    tail = cmd[cmd.index("--additional-config") + 2 :]  # what roast-vllm adds after its own flags
    assert tail == [
        "--dtype",
        "float32",
        "--no-enable-chunked-prefill",
        "--max-model-len",
        "2048",
        "--max-num-batched-tokens",
        "2048",
    ]
    monkeypatch.setattr(ea, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "amx_bf16"})
    cmd, _ = serve_command(model_dir, {}, 8, [], cpu=True)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    cmd, _ = serve_command(model_dir, {}, 8, [], cpu=False)  # GPU: vLLM's defaults
    assert cmd[cmd.index("--additional-config") + 2 :] == []
    with pytest.raises(ValueError, match="scheduler_cls"):
        serve_command(model_dir, {}, 8, ["--scheduler-cls", "x.Y"], cpu=True)


def test_serve_dry_run_prints_the_vllm_options(model_dir, capsys):
    main(["serve", "--model", model_dir, "--dry-run", "-tp", "2", "--", "--port", "8123"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "-tp 2" in line and "--port 8123" in line and '"roast"' in line


# ------------------------------------------------------------------ demo
def test_demo_forwards_vllm_options_to_every_step(tmp_path):
    (tmp_path / "truthfulqa_dev.csv").write_text("")
    args = demo.parse_args(
        ["--data-dir", str(tmp_path), "--out", str(tmp_path), "--dtype", "float32", "-tp", "2"]
    )
    calls: list[list[str]] = []
    demo.roast_loop(args, "MODEL", calls.append)
    assert [c[0] for c in calls] == ["rollout", "estimate", "estimate", "eval", "eval"]
    for argv in calls:
        step = parse_args(argv)  # the step's own parser takes them as vLLM options
        assert step.engine_kwargs == {"dtype": "float32", "tensor_parallel_size": 2}, argv
        assert step.model == "MODEL" and step.max_model_len == 1024


def test_generate_hands_the_vllm_options_to_roast_llm(monkeypatch, model_dir):
    import roast_vllm.engine.llm

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(model, **kw):
        seen.update(kw, model=model)
        raise Stop

    monkeypatch.setattr(roast_vllm.engine.llm, "LLM", fake_llm)
    monkeypatch.setattr(ea, "on_cpu", lambda: True)
    args = parse_args(
        ["generate", "Hi", "--model", model_dir, "--temperature", "0.7", "--dtype", "float32", "-tp", "2"]
    )
    with pytest.raises(Stop):
        args.func(args)
    assert seen["model"] == model_dir and seen["dtype"] == "float32" and seen["tensor_parallel_size"] == 2
    assert seen["kv_cache_memory_bytes"] == 1 << 30 and seen["max_model_len"] == 2048
    # temperature > 0 with a seed: prompts are not chunked on CPU
    assert seen["enable_chunked_prefill"] is False and seen["max_num_batched_tokens"] == 2048
    args = parse_args(["generate", "Hi", "--model", model_dir, "--max-num-batched-tokens", "512"])
    with pytest.raises(Stop):
        args.func(args)  # greedy: chunked prefill in 512-token steps
    assert seen["enable_chunked_prefill"] is True and seen["max_num_batched_tokens"] == 512
