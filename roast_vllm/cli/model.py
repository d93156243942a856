"""``roast-vllm prepare-model``: the embedded SmolLM2 GGUF -> a Hugging Face folder."""

from __future__ import annotations


def cmd_prepare_model(args) -> None:
    from roast_vllm.engine.model_prep import prepare_model

    path = prepare_model(args.out, force=args.force)
    print(path)


def add_commands(sub) -> None:
    s = sub.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to an HF folder")
    s.add_argument("--out", default=None, help="target folder (default: cache dir; $ROAST_VLLM_CACHE_DIR)")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_prepare_model)
