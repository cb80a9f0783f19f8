"""`fleetloop bench scaling --robots 1,2,4`: time to reach 0.8 success per fleet size.

Each fleet size runs the demo's loop from the same pretrained policy (fresh store, Redis and
learner each time), with every simulated robot held to a real-time control rate (--hz) so
robot time, not CPU, is the scarce resource, as on real robots. Success is the fleet's rolling
autonomous success (episodes finished with no intervention) over the last 20 episodes; the
speed-up is time(1 robot) / time(N robots). SOP reported 2.4x from 1 to 4 robots.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--robots", default="1,2,4", help="comma-separated fleet sizes")
    p.add_argument("--hz", type=float, default=30.0, help="each robot's control rate")
    p.add_argument("--minutes", type=float, default=6.0, help="budget per fleet size")
    p.add_argument("--algo", default="hg-dagger", choices=["hg-dagger", "recap"])
    p.add_argument("--tasks", default="demo")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--out", default=None, help="keep each run's results here (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from fleetloop import demo

    sizes = [int(x) for x in args.robots.split(",") if x.strip()]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fleetloop-scaling-"))
    base = argparse.ArgumentParser()
    demo.add_arguments(base)
    runs = {}
    for n in sizes:
        a = base.parse_args(["--robots", str(n), "--algo", args.algo, "--minutes", str(args.minutes),
                             "--tasks", args.tasks, "--eval-episodes", "0", "--dashboard-port", "-1",
                             "--control-hz", str(args.hz), "--seed", str(args.seed), "--out", str(root / f"robots-{n}")])
        a.pretrained_dir = str(root / "pretrained")  # one pretrained policy for every fleet size
        res = demo.run_demo(a)
        episodes = json.loads((root / f"robots-{n}" / "episodes.json").read_text())
        t = demo.time_to_success(episodes, args.threshold)
        runs[n] = {"time_to_threshold_s": None if t is None else round(t, 1), "episodes": len(episodes),
                   "versions_published": res["versions_published"],
                   "autonomous_success_last_20": round(sum(e["autonomous_success"] for e in episodes[-20:])
                                                       / max(1, len(episodes[-20:])), 3)}
    first = runs[sizes[0]]["time_to_threshold_s"]
    for n in sizes:
        t = runs[n]["time_to_threshold_s"]
        runs[n]["speedup_vs_%d" % sizes[0]] = round(first / t, 2) if first and t else None
    result = {"hz": args.hz, "budget_minutes": args.minutes, "threshold": args.threshold, "algo": args.algo,
              "runs": runs, "out": str(root)}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
