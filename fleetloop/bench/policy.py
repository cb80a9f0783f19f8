"""`fleetloop bench policy --json`: act() latency and sustained control rate per size preset.

Measures what a robot sees: one PolicyRuntime.act() call (cached instruction embedding, one 64x64
camera + 39-d state -> [H, A] chunk) with torch on 1 CPU thread. With chunking the robot
executes k of the H actions per call, so the sustained control rate is k / latency.
Also measures BC training throughput (samples/s) per preset, which bounds the online learner.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from fleetloop.policy.interface import Observation
from fleetloop.policy.backend import PolicyModel, build_model
from fleetloop.policy.model import SIZES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--sizes", nargs="*", default=list(SIZES))
    p.add_argument("--calls", type=int, default=300, help="timed act() calls per size")
    p.add_argument("--execute", type=int, default=0, help="k actions executed per chunk (0: H/2)")
    p.add_argument("--beta", type=float, default=1.5, help="guidance weight for the guided timing")
    p.add_argument("--state-only", action="store_true", help="benchmark the state-only variant")
    p.add_argument("--train-steps", type=int, default=10, help="steps timed for training throughput (0: skip)")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--train-threads", type=int, default=1)


def _time_calls(fn, n: int, warmup: int = 20) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out * 1e3  # ms


def _train_rate(net: PolicyModel, steps: int, batch: int, threads: int) -> float:
    from fleetloop.policy.train import make_optimizer, train_step
    torch.set_num_threads(threads)
    cfg = net.config
    opt = make_optimizer(net)
    g = torch.Generator().manual_seed(0)
    b = {"state": torch.randn(batch, cfg.state_dim, generator=g), "lang": torch.randn(batch, cfg.lang_dim, generator=g),
         "indicator": torch.randint(0, 3, (batch,), generator=g),
         "actions": torch.rand(batch, cfg.horizon, cfg.action_dim, generator=g) * 2 - 1,
         "action_mask": torch.ones(batch, cfg.horizon)}
    if cfg.use_images:
        b["images"] = torch.randint(0, 256, (batch, cfg.image_channels, cfg.image_size, cfg.image_size),
                                    dtype=torch.uint8, generator=g)
    train_step(net, opt, b)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        train_step(net, opt, b)
    return batch * steps / (time.perf_counter() - t)


def run(args) -> int:
    from fleetloop.policy.language import get_encoder
    from fleetloop.release.runtime import PolicyRuntime

    torch.set_num_threads(1)
    instruction = "pick up the puck and place it at the goal"
    encoder = get_encoder()
    t = time.perf_counter()
    encoder.encode(instruction)  # loads MiniLM; the first call is the load, not the per-call cost
    load_s = time.perf_counter() - t
    lang_ms = _time_calls(lambda: encoder.embed(["open the top drawer"]), 20, warmup=2)

    rng = np.random.default_rng(0)
    obs = Observation(images={"front": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)},
                      state=rng.standard_normal(39).astype(np.float32))
    result = {"bench": "policy", "device": "cpu", "torch_threads": 1, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "loadavg_1m_at_start": round(os.getloadavg()[0], 2),  # > cpu_count: figures are contended
              "images": not args.state_only,
              "language": {"load_s": round(load_s, 3), "encode_uncached_p50_ms": round(float(np.median(lang_ms)), 3)},
              "sizes": {}}
    for size in args.sizes:
        torch.manual_seed(0)
        net = build_model("tiny", size=size, use_images=not args.state_only)
        cfg = net.config
        k = args.execute or max(1, cfg.horizon // 2)
        policy = PolicyRuntime(net, version="bench", num_threads=1)
        plain = _time_calls(lambda: policy.act(obs, instruction), args.calls)
        policy.beta = args.beta
        guided = _time_calls(lambda: policy.act(obs, instruction, indicator=True), args.calls)
        p50, p99 = float(np.percentile(plain, 50)), float(np.percentile(plain, 99))
        gp50, gp99 = float(np.percentile(guided, 50)), float(np.percentile(guided, 99))
        entry = {"params": policy.model.num_parameters(), "horizon": cfg.horizon, "execute_k": k,
                 "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                 "hz_p50": round(k / p50 * 1e3, 1), "hz_p99": round(k / p99 * 1e3, 1),
                 "guided_beta": args.beta, "guided_p50_ms": round(gp50, 3), "guided_p99_ms": round(gp99, 3),
                 "guided_hz_p99": round(k / gp99 * 1e3, 1),
                 "sustains_30hz": k / p99 * 1e3 >= 30}
        if args.train_steps > 0:
            entry["train_samples_per_s"] = round(_train_rate(build_model("tiny", size=size, use_images=not args.state_only),
                                                             args.train_steps, args.train_batch,
                                                             args.train_threads), 1)
            entry["train_threads"] = args.train_threads
            torch.set_num_threads(1)
        result["sizes"][size] = entry
        if not args.json:
            print(f"{size}: p50 {p50:.2f} ms  p99 {p99:.2f} ms  -> {k / p99 * 1e3:.0f} Hz at p99 (k={k})", flush=True)
    print(json.dumps(result, indent=None if args.json else 1))
    return 0
