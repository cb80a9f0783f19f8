"""`fleetloop vla ...`: bases for the hf-vla backend.

    fleetloop vla make-tiny --family FAMILY --out DIR              a tiny random base (tests, CPU demos) of
                                                                  idefics3|paligemma|llava|gemma3|qwen2_5_vl|qwen2_vl
        [--preset smolvlm-256m|smolvlm-500m|paligemma-3b]           ... or the real architecture, random weights
    fleetloop vla bake CKPT --base-out DIR --checkpoint-out DIR2    the checkpoint's expert baked into a new
        [--set KEY=VALUE ...]                                      base + a checkpoint on it (expert LoRA)
    fleetloop vla provision SRC [--bases DIR]                      check, copy + verify a base; prints its path
        [--family-module MOD]                                      (a module adding family adapters)
    fleetloop vla digest DIR                                       the content digest checkpoints name"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def default_bases_root() -> Path:
    from fleetloop.policy.hf_vla.base import ENV_BASE_DIRS
    dirs = [p for p in os.environ.get(ENV_BASE_DIRS, "").split(":") if p]
    return Path(dirs[0]) if dirs else Path.home() / ".fleetloop" / "bases"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetloop.policy.hf_vla.tiny import FAMILIES  # (this package's import has loaded torch already)
    sub = parser.add_subparsers(dest="vla_command", metavar="ACTION", required=True)
    p = sub.add_parser("make-tiny", help="write a tiny random VLM base (save_pretrained) to --out")
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None,
                   help="a real architecture's hyper-parameters with random weights: smolvlm-256m, smolvlm-500m "
                        "(idefics3), paligemma-3b (paligemma)")
    p = sub.add_parser("bake", help="bake a pretrained checkpoint's action expert into a new base; write a "
                                    "checkpoint on it whose versions carry only LoRA + normalisation")
    p.add_argument("checkpoint", help="an hf-vla checkpoint directory (e.g. from fleetloop pretrain)")
    p.add_argument("--base-out", required=True, help="the new base directory (must not exist or be empty)")
    p.add_argument("--checkpoint-out", required=True, help="the new checkpoint directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the new checkpoint (default expert_mode=lora)")
    p.add_argument("--no-verify", action="store_true", help="skip checking that the baked model acts the same")
    p = sub.add_parser("provision", help="copy a local HF base into the bases directory and verify it")
    p.add_argument("src")
    p.add_argument("--bases", default=None, help="bases root (default: first of $FLEETLOOP_BASE_DIRS, "
                                                 "else ~/.fleetloop/bases)")
    p.add_argument("--family-module", default="", help="a module registering more family adapters (the "
                                                       "family_module setting)")
    p = sub.add_parser("digest", help="print a base directory's sha256 digest")
    p.add_argument("dir")


def check_base(src, family_module: str = "") -> str:
    """What from_pretrained needs, checked before anything is copied: a directory with a config.json
    transformers reads, of a family with an adapter (family_module imported first). Returns the
    family; CheckpointError otherwise."""
    from fleetloop.policy.backend import CheckpointError
    from fleetloop.policy.hf_vla import base_config
    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a Hugging Face model directory (no config.json)")
    if not any(src.glob("*.safetensors")):
        raise CheckpointError(f"{src} holds no .safetensors weights (only safetensors are loaded)")
    return base_config(src, family_module)[0].model_type


def run(args: argparse.Namespace) -> int:
    import sys

    from fleetloop.policy.backend import CheckpointError
    try:
        return _run(args)
    except CheckpointError as e:  # one line, no traceback
        print(f"fleetloop vla {args.vla_command}: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from fleetloop.policy.hf_vla.base import base_digest, provision_base
    if args.vla_command == "make-tiny":
        from fleetloop.policy.hf_vla.tiny import make_tiny_base
        out = make_tiny_base(args.family, args.out, seed=args.seed, preset=args.preset)
        print(json.dumps({"path": str(out), "family": args.family, "preset": args.preset,
                          "sha256": base_digest(out)}))
    elif args.vla_command == "bake":
        from fleetloop.policy.hf_vla.bake import bake_checkpoint
        from fleetloop.policy.pretrain import _settings
        print(json.dumps(bake_checkpoint(args.checkpoint, args.base_out, args.checkpoint_out,
                                         overrides=_settings(args.set), verify=not args.no_verify)))
    elif args.vla_command == "provision":
        check_base(args.src, args.family_module)
        root = Path(args.bases) if args.bases else default_bases_root()
        path = provision_base(args.src, root)
        print(json.dumps({"path": str(path), "sha256": base_digest(path)}))
    elif args.vla_command == "digest":
        print(base_digest(args.dir))
    return 0
