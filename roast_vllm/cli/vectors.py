"""``roast-vllm caa``: steering vectors from contrasting prompt files."""

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
