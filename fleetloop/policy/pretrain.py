"""`fleetloop pretrain`: behaviour cloning of a policy on the demonstrations in a store.

  fleetloop pretrain --store file:///tmp/store --out ckpt/ --size tiny --steps 2000 --batch-size 256
  fleetloop pretrain --backend hf-vla --base /models/smolvlm --set lora_rank=16 --out ckpt/ ...

Any backend (fleetloop.policy.backend): the tiny model by default; `--backend hf-vla --base DIR`
puts a flow-matching action expert on a local Hugging Face VLM and trains LoRA adapters + the
expert (the checkpoint then holds only those, naming the base by its digest).

Reads every demonstration manifest under episodes/ (optionally only --tasks), builds chunk
targets, sets the proprio normaliser from the data, trains with AdamW (warmup + cosine), and
writes a checkpoint directory (model.safetensors + config.json). Deterministic for a given
--seed, data and thread count.

Indicator: demonstrations are labelled "positive" by default (expert data), with the usual 30%
dropout to "unset", so both the conditional and the unconditional branch start out as the
expert policy -- RECAP post-training then teaches the difference between positive and negative.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fleetloop.policy.backend import (INDICATOR_POSITIVE, INDICATOR_UNSET, CheckpointError, backend_names,
                                      build_model, save_checkpoint)
from fleetloop.policy.model import SIZES


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_store_uri
    p.add_argument("--store", default=default_store_uri(), help="store URI (file:///path or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--backend", default="tiny", choices=backend_names(), help="policy backend")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny backend: size preset")
    p.add_argument("--base", help="hf-vla backend: a local Hugging Face VLM checkpoint directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend setting (value parsed as JSON when it can be), e.g. lora_rank=32")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--tasks", nargs="*", default=None, help="only these task ids (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-only", action="store_true", help="ignore cameras (use_images=False)")
    p.add_argument("--camera", action="append", default=None,
                   help="camera(s) to use, in order (default: the demonstrations' cameras)")
    p.add_argument("--only-success", action="store_true", help="skip demonstrations that failed")
    p.add_argument("--demo-indicator", choices=["positive", "unset"], default="positive")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--log-every", type=int, default=100)


def _detect_cameras(store, tasks) -> list[str]:
    from fleetloop.buffer.codec import read_manifest
    from fleetloop.policy.data import list_manifests
    from fleetloop.proto.v1 import episode_pb2 as pb
    for key in list_manifests(store):
        m = read_manifest(store, key)
        if m.kind == pb.EPISODE_KIND_DEMONSTRATION and (not tasks or m.task_id in tasks):
            return list(m.cameras)
    return []


def pretrain(args) -> dict:
    from fleetloop.buffer.store import open_store
    from fleetloop.policy.data import ChunkDataset, batch_to, load_demonstrations, state_stats
    from fleetloop.policy.train import lr_factor, make_optimizer, seed_everything, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    gen = seed_everything(args.seed)
    t0 = time.time()
    store = open_store(args.store)
    cameras = [] if args.state_only else (args.camera or _detect_cameras(store, args.tasks))
    episodes = load_demonstrations(store, tasks=args.tasks, cameras=cameras or None, only_success=args.only_success)
    if not episodes:
        raise SystemExit(f"no demonstrations in {args.store}" + (f" for tasks {args.tasks}" if args.tasks else "")
                         + ": record some with `fleetloop collect` first")
    indicator = INDICATOR_POSITIVE if args.demo_indicator == "positive" else INDICATOR_UNSET
    state_dim, action_dim = episodes[0].states.shape[1], episodes[0].actions.shape[1]
    image_size = int(episodes[0].images.shape[-1]) if cameras else 64
    net = _build(args, state_dim, action_dim, cameras, image_size)
    data = ChunkDataset(episodes, args.horizon, lambda xs: np.stack([net.featurize_instruction(x) for x in xs]),
                        use_images=bool(cameras), default_indicator=indicator)
    print(f"pretrain: {net.backend} backend, {len(episodes)} demonstrations, {len(data)} samples, "
          f"{len(data.instructions)} instructions, cameras={cameras or 'none (state-only)'}, "
          f"loaded in {time.time() - t0:.1f}s", flush=True)
    actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    net.set_normalization(*state_stats(episodes), actions.mean(0), actions.std(0))
    net.to(device)
    opt = make_optimizer(net, args.lr, args.weight_decay)
    warmup = min(100, max(1, args.steps // 10))
    t_train, window, metrics = time.time(), [], {}
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, warmup)
        metrics = train_step(net, opt, batch_to(data.sample(args.batch_size, gen), device))
        window.append(metrics["loss"])
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = (step + 1) * args.batch_size / (time.time() - t_train)
            extra = "".join(f"  {k} {metrics[k]:.4f}" for k in ("l1", "mse") if k in metrics)
            print(f"step {step + 1}/{args.steps}  loss {sum(window) / len(window):.4f}{extra}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {rate:.0f} samples/s", flush=True)
            window = []
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "backend": net.backend,
               "size": args.size if net.backend == "tiny" else None,
               "parameters": net.num_parameters(), "trainable_parameters": net.num_parameters(trainable=True),
               "episodes": len(episodes), "samples": len(data), "tasks": sorted({e.task_id for e in episodes}),
               "instructions": data.instructions, "final_loss": metrics.get("loss"),
               "train_seconds": round(time.time() - t_train, 2), "store": args.store, "version": "pretrain"}
    save_checkpoint(net.cpu(), args.out, extra=summary)
    print(f"wrote checkpoint {args.out} ({net.num_parameters()} parameters, "
          f"{net.num_parameters(trainable=True)} trained)", flush=True)
    return summary


def _settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _build(args, state_dim: int, action_dim: int, cameras: list[str], image_size: int):
    settings = _settings(args.set)
    if args.backend == "tiny":
        return build_model("tiny", size=args.size, state_dim=state_dim, action_dim=action_dim,
                           horizon=args.horizon, use_images=bool(cameras), cameras=cameras or ["front"], **settings)
    if not args.base:
        raise SystemExit(f"--backend {args.backend} needs --base DIR (a local Hugging Face checkpoint directory)")
    if not cameras:
        raise SystemExit(f"--backend {args.backend} is a vision-language model: it needs camera images "
                         "(drop --state-only; record demonstrations with cameras)")
    try:
        return build_model(args.backend, base_dir=args.base, state_dim=state_dim, action_dim=action_dim,
                           horizon=args.horizon, cameras=cameras, image_size=image_size, **settings)
    except CheckpointError as e:  # an unloadable base or unsupported family: one line, no traceback
        raise SystemExit(f"--base {args.base}: {e}") from None


def run(args) -> int:
    print(json.dumps(pretrain(args)))
    return 0
