"""`fleetloop bench learner --size base --device cuda --json`: learner training throughput.
`fleetloop bench learner --backend vla --device cpu --json`: the same for a VLA (a pretrained
Hugging Face VLM + flow-matching action expert with LoRA; --base DIR, or a tiny random model of
--family built on the spot), adding peak GPU memory and MFU.

Times LearnerCore (what each Ray Train worker runs) on synthetic episodes in a frame index,
without Ray or Redis:
  step_only    samples/s of the training step alone (batches sampled beforehand)
  serial       sample -> step in one thread: time in sampling vs in the step
  prefetch     a loader thread samples the next batch while the step runs (as the replay
               actor does from its own process, which also avoids sharing the GIL)
  data_bound   true when sampling a batch takes longer than the step: a prefetching loader
               cannot keep up and the GPU starves.
Images: "memory" (decoded frames in RAM: sampling cost without I/O), "store" (PNG frames in a
temporary file:// store, read through PayloadCache with digest checks: the real path; needs
protobuf and Pillow), or --state-only.

Imports nothing but numpy/torch at module import; runs from a source checkout without
`pip install` (the GPU machine has torch and numpy only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import queue
import sys
import threading
import time
from pathlib import Path


def _map_source_tree() -> None:
    """Outside an installed fleetloop, make fleetloop.buffer/.learner/.proto point at the
    top-level buffer/, learner/, proto/ directories as setup.py's package-dir does."""
    root = Path(__file__).resolve().parents[2]
    for name, d in (("fleetloop.buffer", "buffer"), ("fleetloop.learner", "learner"), ("fleetloop.proto", "proto")):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, root / d / "__init__.py",
                                                      submodule_search_locations=[str(root / d)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="tiny", choices=["tiny", "vla", "hf-vla"],
                   help="policy backend (vla = hf-vla)")
    p.add_argument("--size", default="base", help="tiny backend: model size preset (tiny, small, base)")
    p.add_argument("--base", help="vla backend: a local Hugging Face VLM directory (default: a tiny random one)")
    p.add_argument("--family", default="idefics3",
                   help="vla backend without --base: idefics3, paligemma, llava, gemma3 or qwen2_5_vl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="vla backend setting")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak for MFU (0: looked up from the GPU name)")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--batch-size", type=int, default=0, help="0: 256 (tiny) or 32 (vla)")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--state-only", action="store_true")
    p.add_argument("--images", choices=["memory", "store"], default="memory")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--episodes", type=int, default=32, help="episodes per task and buffer")
    p.add_argument("--episode-len", type=int, default=120)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--algo", default="hg-dagger", choices=["hg-dagger", "uniform"])


# ---- synthetic data -------------------------------------------------------------------------

class _Ref:
    images_bytes = 1  # "this chunk has images"


class _Entry:
    """The EpisodeEntry fields the sampler reads (used when buffer.index cannot be imported)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.chunks = [_Ref()]

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    @property
    def has_intervention(self) -> bool:
        return bool(self.intervention.any())


class _Index:
    def __init__(self):
        self.version, self._eps = 0, []

    def add(self, e) -> None:
        self._eps.append(e)
        self.version += 1

    def __len__(self) -> int:
        return len(self._eps)

    def tasks(self):
        return sorted({e.task_id for e in self._eps})

    def episodes(self, task_id=None, source=None):
        return [e for e in self._eps if (task_id is None or e.task_id == task_id)
                and (source is None or e.source == source)]


def _episodes(args, rng, state_dim: int, action_dim: int):
    import numpy as np
    for m in range(args.tasks):
        for source in ("offline", "online"):
            for k in range(args.episodes):
                t = args.episode_len
                iv = np.zeros(t, bool)
                if source == "online":
                    a = int(rng.integers(0, t - 30))
                    iv[a:a + 30] = True
                yield dict(episode_id=f"{source}-{m}-{k}", task_id=f"task-{m}", instruction=f"do task {m}",
                           policy_version="" if source == "offline" else f"v{k % 10:06d}", source=source,
                           outcome="success" if k % 2 else "failure",
                           states=rng.standard_normal((t, state_dim)).astype(np.float32),
                           actions=rng.uniform(-1, 1, (t, action_dim)).astype(np.float32), intervention=iv)


def _build_index(args, cfg, tmp: str):
    """(index, image_fn) with synthetic episodes; images per --images."""
    import numpy as np
    rng = np.random.default_rng(0)
    use_images = bool(cfg.cameras)
    if use_images and args.images == "store":
        from fleetloop.buffer.codec import commit_episode, encode_chunk, encode_image, read_episode
        from fleetloop.buffer.index import FrameIndex, PayloadCache, entry_from_loaded
        from fleetloop.buffer.store import LocalStore
        from fleetloop.proto.v1 import episode_pb2 as pb
        store, index = LocalStore(tmp), FrameIndex()
        for ep in _episodes(args, rng, cfg.state_dim, cfg.action_dim):
            steps = [pb.Step(index=t, state=ep["states"][t], action=ep["actions"][t], intervention=bool(ep["intervention"][t]),
                             images=[encode_image(rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), np.uint8), c)
                                     for c in cfg.cameras]) for t in range(len(ep["actions"]))]
            kind = pb.EPISODE_KIND_DEMONSTRATION if ep["source"] == "offline" else pb.EPISODE_KIND_ROLLOUT
            m = pb.EpisodeManifest(episode_id=ep["episode_id"], robot_id="bench", task_id=ep["task_id"],
                                   instruction=ep["instruction"], policy_version=ep["policy_version"], kind=kind,
                                   outcome=pb.OUTCOME_SUCCESS if ep["outcome"] == "success" else pb.OUTCOME_FAILURE,
                                   num_steps=len(steps), state_dim=cfg.state_dim, action_dim=cfg.action_dim)
            key = commit_episode(store, m, [(encode_chunk(ep["episode_id"], i // 64, steps[i:i + 64]), len(steps[i:i + 64]))
                                            for i in range(0, len(steps), 64)])
            index.add(entry_from_loaded(read_episode(store, key)))
        return index, PayloadCache(store).images
    try:
        from fleetloop.buffer.index import EpisodeEntry, FrameIndex
        index = FrameIndex()

        def make(ep):
            e = EpisodeEntry(manifest_key="", robot_id="bench", outcome_source="", incomplete=False, chunks=[_Ref()],
                             chunk_starts=np.zeros(1, np.int64), ended_ns=0, **ep)
            return e
    except ImportError:  # no protobuf on this machine
        index, make = _Index(), (lambda ep: _Entry(**ep))
    frames: dict[str, np.ndarray] = {}
    for ep in _episodes(args, rng, cfg.state_dim, cfg.action_dim):
        index.add(make(ep))
        if use_images:  # one random clip per episode, shared across cameras
            frames[ep["episode_id"]] = rng.integers(0, 256, (len(ep["actions"]), cfg.image_size, cfg.image_size, 3),
                                                    np.uint8)
    return index, (lambda e, t: {c: frames[e.episode_id][t] for c in cfg.cameras}) if use_images else None


class _Replay:
    """BatchSource over pre-sampled batches: the step alone."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self, step):
        self.i += 1
        return self.batches[self.i % len(self.batches)]

    def report_losses(self, step, batch, losses):
        pass


class _Prefetch:
    """A loader thread keeps up to two batches ready."""

    def __init__(self, source):
        self.source = source
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            b = self.source.next_batch(0)
            while not self.stop.is_set():
                try:
                    self.q.put(b, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def next_batch(self, step):
        return self.q.get()

    def report_losses(self, step, batch, losses):
        self.source.report_losses(step, batch, losses)

    def close(self):
        self.stop.set()
        self.t.join(5)


def bench(args) -> dict:
    """The figures; the scratch folder (a tiny base, a store of frames) is removed afterwards."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fleetloop-bench-learner-") as tmp:
        return _bench(args, tmp)


def _bench(args, tmp: str) -> dict:
    import numpy as np
    import torch

    _map_source_tree()
    from fleetloop.buffer.sampler import BufferSampler, SamplerConfig, UniformRules
    from fleetloop.learner.core import CoreConfig, LearnerCore, LocalSource

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if not args.batch_size:
        args.batch_size = 256 if args.backend == "tiny" else 32
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    net = _make_model(args, tmp)
    cfg = net.spec
    t0 = time.perf_counter()
    index, image_fn = _build_index(args, cfg, tmp)
    build_s = time.perf_counter() - t0
    if args.algo == "hg-dagger":
        from fleetloop.learner.algorithms.hg_dagger import HGDagger
        rules = HGDagger()
    else:
        rules = UniformRules()
    if net.backend == "tiny":  # a stand-in embedding per instruction (no MiniLM needed here)
        lang = {f"do task {m}": np.random.default_rng(m).standard_normal(net.config.lang_dim).astype(np.float32)
                for m in range(args.tasks)}
        encode = lang.__getitem__
    else:
        encode = net.featurize_instruction
    sampler = BufferSampler(index, SamplerConfig(horizon=cfg.horizon), rules, encode=encode,
                            image_fn=image_fn, cameras=list(cfg.cameras), image_size=cfg.image_size)
    sampler.set_learner_version("v000010")
    core_cfg = CoreConfig(batch_size=args.batch_size, precision=precision)
    local = LocalSource(sampler, args.batch_size)
    out: dict = {"backend": net.backend, "size": args.size if net.backend == "tiny" else None,
                 "device": str(device), "params": net.num_parameters(),
                 "trainable_params": net.num_parameters(trainable=True), "precision": precision,
                 "batch_size": args.batch_size, "use_images": bool(cfg.cameras),
                 "images": args.images if cfg.cameras else None, "torch_threads": torch.get_num_threads(),
                 "frames_indexed": int(sum(e.num_steps for e in index.episodes())), "index_build_s": round(build_s, 2),
                 "torch": torch.__version__, "python": platform.python_version()}
    if net.backend != "tiny":
        out["model"] = {k: v for k, v in net.config_dict().items() if k not in ("base",)}
        out["base"] = net.config_dict().get("base")
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)

    def run(source, steps):
        core = LearnerCore(net, source, rules, core_cfg, device=device, sync_timing=True)
        for _ in range(args.warmup):
            core.train_step()
        core._times.clear()
        t = time.perf_counter()
        for _ in range(steps):
            core.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
        return core.timing(), steps * args.batch_size / wall

    # 1. the step alone
    batches = [sampler.sample(args.batch_size) for _ in range(8)]
    timing, rate = run(_Replay(batches), args.steps)
    out["step_only"] = {"samples_per_s": round(rate, 1), "step_ms": timing["train_ms"]}
    out["samples_per_s"] = out["step_only"]["samples_per_s"]  # the headline: the learner step's rate
    out["step_ms"] = timing["train_ms"]
    flops = net.flops_per_sample()
    out["model_tflop_per_sample"] = round(flops / 1e12, 6)
    out["achieved_tflops"] = round(flops * rate / 1e12, 4)
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        peak = args.peak_tflops or _peak_tflops(out["gpu"], precision)
        if peak:
            out["peak_tflops"] = peak
            out["mfu"] = round(flops * rate / (peak * 1e12), 4)
    # 2. serial: sample then step
    timing, rate = run(local, args.steps)
    out["serial"] = {"samples_per_s": round(rate, 1), "sample_ms": timing["sample_ms"], "step_ms": timing["train_ms"],
                     "data_wait_fraction": timing["data_wait_fraction"]}
    # 3. sampling overlapped with the step
    pre = _Prefetch(local)
    try:
        timing, rate = run(pre, args.steps)
    finally:
        pre.close()
    out["prefetch"] = {"samples_per_s": round(rate, 1), "wait_ms": timing["sample_ms"]}
    sample_ms, step_ms = out["serial"]["sample_ms"], out["step_only"]["step_ms"]
    out["data_bound"] = bool(sample_ms > step_ms)
    out["loader_samples_per_s"] = round(1e3 * args.batch_size / sample_ms, 1) if sample_ms else None
    return out


# Dense peak TFLOP/s by GPU name (bf16 / fp32), from the vendors' data sheets.
_PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
          "A10G": (125.0, 31.2), "L4": (121.0, 30.3), "RTX 4090": (165.0, 82.6)}


def _peak_tflops(gpu_name: str, precision: str) -> float | None:
    for key, (bf16, fp32) in _PEAKS.items():
        if key.lower() in gpu_name.lower():
            return bf16 if precision == "bf16" else fp32
    return None


def _make_model(args, tmp: str):
    """The model to time, built through the policy seam."""
    if args.backend == "tiny":
        from fleetloop.policy.backend import build_model
        return build_model("tiny", size=args.size, use_images=not args.state_only, horizon=args.horizon)
    from fleetloop.policy.backend import build_model
    from fleetloop.policy.pretrain import _settings
    base = args.base
    if not base:
        from fleetloop.policy.hf_vla.tiny import make_tiny_base
        base = str(make_tiny_base(args.family, Path(tmp) / f"tiny-{args.family}"))
    if args.state_only:
        raise SystemExit("--backend vla needs images (drop --state-only)")
    return build_model("hf-vla", base_dir=base, state_dim=39, action_dim=4, horizon=args.horizon,
                       cameras=["front"], image_size=64, **_settings(args.set))


def run(args) -> int:
    result = bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
        verdict = "data loading starves the step" if result["data_bound"] else "the step is the bottleneck"
        print(f"{result['backend']} {args.size if result['backend'] == 'tiny' else ''} on {result['device']}: step {result['step_only']['samples_per_s']:.0f} samples/s, "
              f"sampler {result['loader_samples_per_s']} samples/s -> {verdict}")
    return 0
