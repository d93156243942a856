"""``roast-vllm caa``: steering vectors from contrasting prompt files; ``roast-vllm
convert``: between this project's ``.safetensors`` and llama.cpp / repeng control
vectors (``.gguf``)."""

from __future__ import annotations

from roast_vllm.cli.common import parse_layers, read_prompts


def cmd_caa(args) -> None:
    from roast_vllm.methods.caa import caa_from_prompts

    vec = caa_from_prompts(
        read_prompts(args.positive),
        read_prompts(args.negative),
        model=args.model,
        layers=parse_layers(args.layers),
        reduce=args.reduce,
        chat=args.chat,
        normalize=args.normalize,
        provenance={"positive": str(args.positive), "negative": str(args.negative)},
    )
    vec.save(args.out)
    norms = ", ".join(f"{l}:{t.norm():.2f}" for l, t in list(vec.directions.items())[:6])
    print(f"wrote {args.out}: {len(vec.layers)} layers, dim {vec.hidden_size} (norms {norms} ...)")


def _load(path: str):
    from roast_vllm import SteeringVector

    return SteeringVector.load_gguf(path) if str(path).endswith(".gguf") else SteeringVector.load(path)


def cmd_convert(args) -> None:
    vec = _load(args.input)
    if str(args.output).endswith(".gguf"):
        vec.save_gguf(args.output, model_hint=args.model_hint, drop_layer0=args.drop_layer0)
    elif str(args.output).endswith(".safetensors"):
        vec.save(args.output)
    else:
        raise SystemExit(f"error: {args.output}: the output must end in .gguf or .safetensors")
    print(f"wrote {args.output}: layers {vec.layers}, dim {vec.hidden_size}, site {vec.site}")


def add_commands(sub) -> None:
    s = sub.add_parser("caa", help="contrastive mean-difference vector from two prompt files")
    s.add_argument("--positive", required=True, help="prompts showing the behaviour (.txt lines or .jsonl)")
    s.add_argument("--negative", required=True, help="prompts showing its opposite")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default=None)
    s.add_argument("--layers", default=None, help="e.g. '8-20' or '10,12' (default: all)")
    s.add_argument("--reduce", choices=["last", "mean"], default="mean", help="token pooling")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    s.add_argument("--normalize", action="store_true", help="unit-norm each layer's direction")
    s.set_defaults(func=cmd_caa)

    s = sub.add_parser(
        "convert", help="convert a vector: .safetensors (ours) <-> .gguf (llama.cpp / repeng control vector)"
    )
    s.add_argument("input", help=".safetensors or .gguf")
    s.add_argument("output", help=".safetensors or .gguf")
    s.add_argument("--model-hint", default="llama", help="GGUF controlvector.model_hint (repeng needs it)")
    s.add_argument(
        "--drop-layer0",
        action="store_true",
        help="leave out layer 0 (llama.cpp cannot steer it and refuses a file with direction.0)",
    )
    s.set_defaults(func=cmd_convert)
