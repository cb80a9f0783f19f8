"""`fleetloop bench broadcast`: how long a fleet takes to pick up a new policy version.

N PolicySlots (one per simulated robot, each with its own Redis and S3 clients) subscribe to
the policy channel of a private Redis; a learner publishes a random `--model-mb` safetensors
blob to a local S3-protocol server (moto, its own process). Per actor we measure publish ->
loaded: from the moment the fleet pointer moved to the moment that actor holds the verified
(sha256) and loaded weights, ready to swap in at its next episode start.

Yardsticks, same run, same store, same number of clients, same threads/processes mode:
  raw_s    N concurrent plain boto3 get_object calls of the same bytes (wall time)
  floor_s  the same, plus the work any robot must do with them: sha256 + load
Each round takes fresh yardsticks right before its broadcast (this machine's load drifts); the
medians are used. ratio = p99 / raw_s (target <= 1.5); ratio_vs_floor = p99 / floor_s is the
overhead of the machinery itself (notice, resolve, manifest).

A last phase publishes a version in which only `--delta-changed` of the tensors changed (frozen
encoder, adapters): robots holding the parent download only the changed blocks. On loopback the
saving is bytes, not seconds (hashing and loading the full model still dominate).

--mode processes runs each robot in its own process (no shared GIL). Prints one JSON object.

--backend vla: the versions are a real VLA's (fleetloop.policy.hf_vla: a Hugging Face VLM base
+ flow-matching expert, LoRA), loaded by robots through the real PolicyLoader: every robot holds
the base (provisioned, verified by digest) and the fleet first gets one full push of the model,
then LoRA versions that carry only the adapters + expert (`update_mb` vs `full_mb`,
`update_share`), each timed publish -> loaded like the full push. `--bake` first bakes the freshly
built model's expert into a new base (fleetloop.policy.hf_vla.bake; robots hold that base) and
publishes versions of the baked model (expert LoRA): backbone LoRA + expert LoRA + normalisation.
`update_bytes` / `full_bytes` split each kind of version into lora / expert / backbone (VLM
weights) / other (normalisation) / header bytes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fleetloop import config

BUCKET = "bench-broadcast"


def add_arguments(p) -> None:
    p.add_argument("--actors", type=int, default=16)
    p.add_argument("--model-mb", type=float, default=200.0)
    p.add_argument("--mode", choices=("threads", "processes"), default="threads")
    p.add_argument("--rounds", type=int, default=3, help="broadcast rounds, each after its own raw baseline")
    p.add_argument("--delta-changed", type=float, default=0.1,
                   help="share of tensors changed in the last (delta) version; 0 skips that phase")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the fleet")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--backend", choices=("bytes", "vla"), default="bytes",
                   help="bytes: a random --model-mb blob; vla: a real VLA's full and LoRA versions")
    p.add_argument("--base", help="vla: a local Hugging Face VLM directory (default: a tiny random one)")
    p.add_argument("--family", default="idefics3",
                   help="vla without --base: idefics3, paligemma, llava, gemma3 or qwen2_5_vl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="vla: a backend setting")
    p.add_argument("--preset", default=None,
                   help="vla without --base: a random base of a real architecture (smolvlm-256m, smolvlm-500m, "
                        "paligemma-3b) instead of a tiny one")
    p.add_argument("--bake", action="store_true",
                   help="vla: bake the built model's expert into a new base first; versions are then LoRA "
                        "(backbone + expert) + normalisation only")


class BenchPolicy:
    """What load_fn returns: the loaded tensors (torch, like a real load) and a version."""
    horizon, action_dim = 1, 1

    def __init__(self, tensors: dict, version: str = ""):
        self.tensors, self.version = tensors, version


def load_fn(config_json: str, data: bytes, version: str) -> BenchPolicy:
    from safetensors.torch import load
    return BenchPolicy(load(data), version)


def random_model(model_mb: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    total = int(model_mb * 1e6) // 4
    per = 4 * 1024 * 1024  # 16 MB tensors
    return {f"layer{i:03d}.weight": rng.standard_normal(min(per, total - o), dtype=np.float32)
            for i, o in enumerate(range(0, total, per))}


def _settings(endpoint: str, create_bucket: bool = False):
    from fleetloop.config import S3Settings
    return S3Settings(endpoint_url=endpoint, access_key="test", secret_key="test", create_bucket=create_bucket)


def _make_slot(redis_url: str, endpoint: str, robot_id: str, backend: str = "bytes"):
    import redis
    from fleetloop.actor.weights import PolicySlot
    from fleetloop.buffer.store import S3Store
    from fleetloop.release.registry import PolicyRegistry
    client = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    registry = PolicyRegistry(S3Store(BUCKET, "", _settings(endpoint)), client)
    if backend == "vla":  # what a robot runs: verify, build once on its base, then overlay adapters
        from fleetloop.release.runtime import PolicyLoader
        return PolicySlot(registry, robot_id, PolicyLoader(), poll_interval_s=5.0, keep_base=False)
    return PolicySlot(registry, robot_id, load_fn, poll_interval_s=5.0)


def _process_actor(redis_url: str, endpoint: str, robot_id: str, cmd_q, result_q, backend: str = "bytes") -> None:
    """One robot in its own process. Commands: ("await", version) -> reports its status once
    that version is loaded; ("swap",) -> begin_episode(); None -> exit."""
    import safetensors.torch  # noqa: F401  (as in run(): import torch before timing)
    slot = _make_slot(redis_url, endpoint, robot_id, backend).start()
    while (cmd := cmd_q.get()) is not None:
        if cmd[0] == "swap":
            slot.begin_episode()
            result_q.put((robot_id, "swap", None))
        else:
            ok = slot.wait_ready(cmd[1], timeout=600)
            result_q.put((robot_id, cmd[1], slot.status() if ok else None))
    slot.stop()


def _client_get(client, key: str, verify_load: bool) -> int:
    """One plain download; with verify_load also the work any robot must do: sha256 + load."""
    data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if verify_load:
        hashlib.sha256(data).hexdigest()
        load_fn("{}", data, "")
    return len(data)


def _process_raw_get(endpoint: str, key: str, verify_load: bool, start_evt, result_q) -> None:
    from fleetloop.buffer.store import S3Store
    if verify_load:
        import safetensors.torch  # noqa: F401
    client = S3Store(BUCKET, "", _settings(endpoint))._client
    result_q.put(None)  # ready: imports done, client built
    start_evt.wait()
    n = _client_get(client, key, verify_load)
    result_q.put((time.time(), n))


class Fleet:
    """N actors as threads or processes; await(version) -> one last_load dict per actor."""

    def __init__(self, mode: str, n: int, redis_url: str, endpoint: str, backend: str = "bytes"):
        self.mode, self.n = mode, n
        if mode == "threads":
            self.slots = [_make_slot(redis_url, endpoint, f"robot-{i:03d}", backend).start() for i in range(n)]
        else:
            ctx = mp.get_context("spawn")
            self.result_q = ctx.Queue()
            self.cmd_qs = [ctx.Queue() for _ in range(n)]
            self.procs = [ctx.Process(target=_process_actor, daemon=True,
                                      args=(redis_url, endpoint, f"robot-{i:03d}", self.cmd_qs[i], self.result_q,
                                            backend))
                          for i in range(n)]
            for p in self.procs:
                p.start()

    def await_version(self, version: str, timeout: float) -> list[dict]:
        if self.mode == "threads":
            deadline = time.monotonic() + timeout
            for s in self.slots:
                if not s.wait_ready(version, timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{s.robot_id} did not load {version}: {s.status()['last_error']}")
            return [s.status() for s in self.slots]
        return self._command(("await", version), timeout)

    def begin_episode(self) -> None:
        """Every robot starts an episode (swaps in what it loaded), as it would between phases."""
        if self.mode == "threads":
            for s in self.slots:
                s.begin_episode()
        else:
            self._command(("swap",), 60)

    def _command(self, cmd: tuple, timeout: float) -> list[dict]:
        for q in self.cmd_qs:
            q.put(cmd)
        out = []
        for _ in range(self.n):
            robot_id, what, st = self.result_q.get(timeout=timeout)
            if what != "swap" and st is None:
                raise TimeoutError(f"{robot_id} did not load {what}")
            out.append(st)
        return out

    def close(self) -> None:
        if self.mode == "threads":
            for s in self.slots:
                s.stop()
            return
        for q in self.cmd_qs:
            q.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def raw_download_s(mode: str, n: int, endpoint: str, key: str, verify_load: bool = False) -> float:
    """Wall time for n concurrent plain get_object calls of `key`, one client each (threads or
    processes, like the fleet). verify_load: each client also hashes and loads what it got."""
    from fleetloop.buffer.store import S3Store
    if mode == "threads":
        clients = [S3Store(BUCKET, "", _settings(endpoint))._client for _ in range(n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            sizes = list(pool.map(lambda c: _client_get(c, key, verify_load), clients))
        elapsed = time.perf_counter() - t0
        assert len(set(sizes)) == 1
        return elapsed
    ctx = mp.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_process_raw_get, args=(endpoint, key, verify_load, start, q), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    for _ in range(n):  # every process has imported and built its client before the clock starts
        assert q.get(timeout=300) is None
    t0 = time.time()
    start.set()
    ends = [q.get(timeout=600)[0] for _ in range(n)]
    for p in procs:
        p.join(30)
    return max(ends) - t0


def _wait_subscribers(client, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dict(client.pubsub_numsub(config.POLICY_CHANNEL)).get(config.POLICY_CHANNEL.encode(), 0) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError("actors did not subscribe in time")


def _latencies(statuses: list[dict], version: str) -> tuple[list[float], int, list[str]]:
    lat, moved, via = [], 0, []
    for st in statuses:
        ll = st["last_load"]
        assert ll and ll["version"] == version, st
        lat.append(ll["publish_to_loaded_s"])
        moved += ll["bytes_moved"]
        via.append(ll["via"])
    return lat, moved, via


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


def run(args) -> int:
    if args.backend == "vla":
        return run_vla(args)
    import redis
    from safetensors.numpy import save

    from fleetloop.buffer.store import S3Store
    from fleetloop.release.registry import PolicyRegistry
    from fleetloop.services import MotoS3Server, RedisServer

    import safetensors.torch  # noqa: F401  a robot has torch loaded already; keep its import out of the timing
    # moto keeps objects above 5 MB in temp files; keep them in memory so the store's disk is not
    # what we measure (this speeds up the raw baseline as much as the fleet).
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(1 << 34))
    tensors = random_model(args.model_mb)
    weights = save(tensors)
    rounds, raws, floors, lat, moved = [], [], [], [], 0
    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs:
        client = redis.Redis.from_url(rs.url)
        learner = PolicyRegistry(S3Store(BUCKET, "", _settings(s3.endpoint, create_bucket=True)), client)
        learner.store.put("raw/model.safetensors", weights)  # the same bytes, for the baseline
        fleet = Fleet(args.mode, args.actors, rs.url, s3.endpoint)
        try:
            _wait_subscribers(client, args.actors)
            # Interleave baseline and broadcast rounds: this machine's load drifts, so a single
            # baseline taken at another moment would not be a fair yardstick.
            for r in range(args.rounds):
                raws.append(raw_download_s(args.mode, args.actors, s3.endpoint, "raw/model.safetensors"))
                floors.append(raw_download_s(args.mode, args.actors, s3.endpoint, "raw/model.safetensors",
                                             verify_load=True))
                t0 = time.perf_counter()
                m = learner.publish(weights, json.dumps({"bench": True}), learner_step=25 * (r + 1), algorithm="bench")
                publish_s = time.perf_counter() - t0
                statuses = fleet.await_version(m.version, args.timeout)
                fleet.begin_episode()
                r_lat, r_moved, _ = _latencies(statuses, m.version)
                lat += r_lat
                moved += r_moved
                rounds.append({"raw_s": round(raws[-1], 3), "floor_s": round(floors[-1], 3), "p50_s": _pct(r_lat, 50), "p99_s": _pct(r_lat, 99),
                               "publish_s": round(publish_s, 3),
                               "fetch_s_max": round(max(s["last_load"]["fetch_s"] for s in statuses), 3),
                               "load_s_max": round(max(s["last_load"]["load_s"] for s in statuses), 3)})
            raws.append(raw_download_s(args.mode, args.actors, s3.endpoint, m.weights_key))
            raw_s = float(np.median(raws))
            result = {
                "actors": args.actors, "model_mb": round(len(weights) / 1e6, 1), "mode": args.mode,
                "rounds": args.rounds, "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99), "max_s": round(max(lat), 3),
                "raw_s": round(raw_s, 3), "ratio": round(_pct(lat, 99) / raw_s, 3),
                "ratio_median_round": round(float(np.median([x["p99_s"] / x["raw_s"] for x in rounds])), 3),
                "floor_s": round(float(np.median(floors)), 3),
                "ratio_vs_floor": round(_pct(lat, 99) / float(np.median(floors)), 3),
                "bytes_moved": moved, "bytes_per_load": moved // len(lat), "loaded": len(lat),
                "raw_samples_s": [round(x, 3) for x in raws], "per_round": rounds, "cpus": os.cpu_count(),
            }
            if args.delta_changed > 0:
                changed = sorted(tensors)[:max(1, round(len(tensors) * args.delta_changed))]
                for name in changed:
                    tensors[name] = tensors[name] + np.float32(1e-3)
                t0 = time.perf_counter()
                m2 = learner.publish(save(tensors), json.dumps({"bench": True}), parent_version=m.version,
                                     learner_step=25 * (args.rounds + 1), algorithm="bench")
                delta_publish_s = time.perf_counter() - t0
                statuses = fleet.await_version(m2.version, args.timeout)
                dlat, dmoved, via = _latencies(statuses, m2.version)
                result["delta"] = {
                    "changed_tensors": f"{len(changed)}/{len(tensors)}", "delta_mb": round(m2.delta_bytes / 1e6, 2),
                    "publish_s": round(delta_publish_s, 3), "p50_s": _pct(dlat, 50), "p99_s": _pct(dlat, 99),
                    "bytes_moved": dmoved, "via_delta": via.count("delta"),
                }
        finally:
            fleet.close()
            client.close()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def weights_breakdown(data: bytes) -> dict[str, int]:
    """Bytes of a safetensors blob by kind: LoRA adapters, expert weights, backbone (VLM) weights,
    other tensors (normalisation), header."""
    n = int.from_bytes(data[:8], "little")
    out = {"lora": 0, "expert": 0, "backbone": 0, "other": 0, "header": 8 + n}
    for name, info in json.loads(data[8:8 + n]).items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        kind = ("lora" if ".lora_" in name else "expert" if name.startswith("expert.")
                else "backbone" if name.startswith("vlm.") else "other")
        out[kind] += size
    return out


def run_vla(args) -> int:
    """Full push of a VLA, then LoRA (adapters + expert) versions on top of the same base; with
    --bake the expert is baked into the base first and versions carry only LoRA + normalisation.
    The scratch folder (a preset base is GBs) is removed afterwards, also after an error."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fleetloop-bench-broadcast-") as tmp:
        return _run_vla(args, tmp)


def _run_vla(args, tmp: str) -> int:
    import redis
    import torch

    from fleetloop.buffer.store import S3Store
    from fleetloop.policy.backend import build_model, export_version
    from fleetloop.policy.pretrain import _settings as parse_settings
    from fleetloop.release.registry import PolicyRegistry
    from fleetloop.services import MotoS3Server, RedisServer

    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(1 << 34))
    base = args.base
    if not base:
        from fleetloop.policy.hf_vla.tiny import make_tiny_base
        name = args.preset or "tiny"
        base = str(make_tiny_base(args.family, os.path.join(tmp, f"{name}-{args.family}"), preset=args.preset))
    torch.manual_seed(0)
    model = build_model("hf-vla", base_dir=base, state_dim=39, action_dim=4, horizon=8, cameras=["front"],
                        image_size=64, **parse_settings(args.set))
    bake_s = None
    if getattr(args, "bake", False):
        from fleetloop.policy.hf_vla.bake import bake_model
        t0 = time.perf_counter()
        model = bake_model(model, os.path.join(tmp, "baked-base"))  # the source model is dropped here
        bake_s = round(time.perf_counter() - t0, 2)
    full = export_version(model, trained_only=False)
    cfg = model.config_dict()
    n_expert = sum(p.numel() for n, p in model.named_parameters() if n.startswith("expert.") and ".lora_" not in n)
    result: dict = {"backend": "hf-vla", "family": cfg["base"]["family"], "preset": args.preset,
                    "baked_expert": bool(model.baked_expert), "expert_mode": cfg["expert_mode"],
                    "backbone_mode": cfg["backbone_mode"], "expert_layers": cfg["expert_layers"],
                    "expert_width": cfg["expert_width"], "lora_rank": cfg["lora_rank"],
                    "actors": args.actors, "mode": args.mode, "rounds": args.rounds,
                    "params": model.num_parameters(), "expert_params": n_expert,
                    "trainable_params": model.num_parameters(trainable=True)}
    if bake_s is not None:
        result["bake_s"] = bake_s
    with MotoS3Server() as s3, RedisServer(appendonly=False) as rs:
        client = redis.Redis.from_url(rs.url)
        learner = PolicyRegistry(S3Store(BUCKET, "", _settings(s3.endpoint, create_bucket=True)), client,
                                 delta=False)
        fleet = Fleet(args.mode, args.actors, rs.url, s3.endpoint, backend="vla")
        try:
            _wait_subscribers(client, args.actors)
            t0 = time.perf_counter()
            m = learner.publish(full.weights, full.config_json, backend=full.backend, learner_step=0, algorithm="bench")
            full_publish_s = time.perf_counter() - t0
            statuses = fleet.await_version(m.version, args.timeout)
            fleet.begin_episode()
            f_lat, f_moved, _ = _latencies(statuses, m.version)
            lat, moved, publish_s, update_bytes, update_kinds, per_round = [], 0, [], 0, {}, []
            for r in range(args.rounds):
                with torch.no_grad():  # stands in for a learner update: every trained tensor moves
                    for p in model.trainable_parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                v = export_version(model, trained_only=True)
                update_bytes = len(v.weights)
                update_kinds = weights_breakdown(v.weights)
                t0 = time.perf_counter()
                m = learner.publish(v.weights, v.config_json, backend=v.backend, base_sha256=v.base_sha256,
                                    parent_version=m.version, learner_step=25 * (r + 1), algorithm="bench")
                publish_s.append(time.perf_counter() - t0)
                statuses = fleet.await_version(m.version, args.timeout)
                fleet.begin_episode()
                r_lat, r_moved, _ = _latencies(statuses, m.version)
                lat += r_lat
                moved += r_moved
                # round 1 builds each robot's shared model on the base (after a self-contained full
                # push); later rounds only overlay the version's tensors on it
                per_round.append({"p50_s": _pct(r_lat, 50), "p99_s": _pct(r_lat, 99),
                                  "fetch_s_max": round(max(s["last_load"]["fetch_s"] for s in statuses), 3),
                                  "load_s_max": round(max(s["last_load"]["load_s"] for s in statuses), 3)})
            result.update({
                "full_mb": round(len(full.weights) / 1e6, 3), "update_mb": round(update_bytes / 1e6, 3),
                "update_share": round(update_bytes / len(full.weights), 4),
                "update_bytes": update_kinds, "full_bytes": weights_breakdown(full.weights),
                "full_push": {"p50_s": _pct(f_lat, 50), "p99_s": _pct(f_lat, 99), "publish_s": round(full_publish_s, 3),
                              "bytes_per_load": f_moved // len(f_lat)},
                "update": {"p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99), "max_s": round(max(lat), 3),
                           "publish_s": round(float(np.median(publish_s)), 3),
                           "bytes_per_load": moved // len(lat), "loaded": len(lat), "per_round": per_round},
                "base_sha256": full.config_json and m.base_sha256, "cpus": os.cpu_count(),
            })
            result["update_vs_full_p99"] = round(result["update"]["p99_s"] / max(1e-9, result["full_push"]["p99_s"]), 3)
        finally:
            fleet.close()
            client.close()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
