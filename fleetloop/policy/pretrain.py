"""`fleetloop pretrain`: behaviour cloning of the VLA on the demonstrations in a store.

  fleetloop pretrain --store file:///tmp/store --out ckpt/ --size tiny --steps 2000 --batch-size 256

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

import torch

from fleetloop.policy.model import (INDICATOR_POSITIVE, INDICATOR_UNSET, SIZES, ModelConfig, VLAPolicyNet,
                                    save_checkpoint)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fleetloop.config import default_store_uri
    p.add_argument("--store", default=default_store_uri(), help="store URI (file:///path or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
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
    from fleetloop.policy.language import get_encoder
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
    encoder = get_encoder()
    indicator = INDICATOR_POSITIVE if args.demo_indicator == "positive" else INDICATOR_UNSET
    data = ChunkDataset(episodes, args.horizon, encoder.encode_many, use_images=bool(cameras),
                        default_indicator=indicator)
    print(f"pretrain: {len(episodes)} demonstrations, {len(data)} samples, {len(data.instructions)} "
          f"instructions, cameras={cameras or 'none (state-only)'}, loaded in {time.time() - t0:.1f}s", flush=True)

    cfg = ModelConfig.preset(args.size, state_dim=data.state_dim, action_dim=data.action_dim, horizon=args.horizon,
                             use_images=bool(cameras), cameras=cameras or ["front"])
    net = VLAPolicyNet(cfg)
    net.set_state_stats(*state_stats(episodes))
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
            print(f"step {step + 1}/{args.steps}  loss {sum(window) / len(window):.4f}  l1 {metrics['l1']:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {rate:.0f} samples/s", flush=True)
            window = []
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "size": args.size,
               "episodes": len(episodes), "samples": len(data), "tasks": sorted({e.task_id for e in episodes}),
               "instructions": data.instructions, "final_loss": metrics.get("loss"),
               "train_seconds": round(time.time() - t_train, 2), "store": args.store, "version": "pretrain"}
    save_checkpoint(net.cpu(), args.out, extra=summary)
    print(f"wrote checkpoint {args.out} ({net.num_parameters()} parameters)", flush=True)
    return summary


def run(args) -> int:
    print(json.dumps(pretrain(args)))
    return 0
