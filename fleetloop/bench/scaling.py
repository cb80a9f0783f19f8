"""`fleetloop bench scaling --robots 1,2,4 --seeds 3`: time to reach 0.8 success per fleet size.

Each fleet size runs the demo's loop from the same pretrained policy (fresh store, Redis and
learner each time), with every simulated robot held to a real-time control rate (--hz) so
robot time, not CPU, is the scarce resource, as on real robots. Success is the fleet's rolling
autonomous success (episodes finished with no intervention) over the last 20 episodes; the time
to the threshold is the first time that rolling rate reached it *and held up*: the --hold
episodes after the crossing (default 20, disjoint from the window) were at the threshold too.
The first crossing alone (`first_crossing_s`, also reported) is optimistic -- the maximum of
many overlapping noisy windows -- and measured so it had already fallen back in most 4-robot runs.
The speed-up is time(smallest fleet) / time(N robots). SOP reported 2.4x from 1 to 4 robots.

Seeds: benchmark seed s pretrains its own policy (demonstrations on scene seeds s..s+n-1, its
own initialisation) and runs every fleet size from it with robot seeds s*1000 + i + 1, so the
spread over seeds covers both the pretrained policy and the online episodes. A run stops as soon
as its figure is in (the threshold reached), so the budget (--minutes) only binds when a fleet
does not get there; such a run is reported as censored (time None, `reached` False) and its
speed-up as a lower bound (budget / time(N)) in `speedup_lower_bounds`, never in the mean.

JSON: `speedup_mean`, `speedup_min`, `speedup_max`, `speedup_std` (the largest fleet vs the
smallest, over the seeds where both reached the threshold), `per_seed` (per seed the times to
the threshold per fleet size and the speed-ups), `speedup` (the same statistics per fleet
size), and, as before, `runs` (per fleet size: the first seed's run, with
`time_to_threshold_s_per_seed` and `time_to_threshold_s_mean` added). `--plot` (default
OUT/scaling.png) draws the scaling curve: mean time to the threshold and speed-up per fleet
size, error bars min-max over seeds, every seed's point.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("fleetloop.bench.scaling")

WINDOW = 20  # episodes in the pooled fleet's rolling autonomous success


def add_arguments(p) -> None:
    p.add_argument("--robots", default="1,2,4", help="comma-separated fleet sizes")
    p.add_argument("--hz", type=float, default=30.0, help="each robot's control rate")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="budget per fleet size and seed (a run stops earlier once the threshold is reached)")
    p.add_argument("--seeds", default="1",
                   help="N: seeds --seed .. --seed+N-1; or a comma-separated list of seeds")
    p.add_argument("--algo", default="hg-dagger", choices=["hg-dagger", "recap"])
    p.add_argument("--tasks", default="demo")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--hold", type=int, default=WINDOW,
                   help="episodes after the crossing that must be at the threshold too (0: the first crossing)")
    p.add_argument("--demos-per-task", type=int, default=None, help="demonstrations per task (demo's default: 5)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--no-early-stop", action="store_true", help="run every fleet for the whole budget")
    p.add_argument("--out", default=None, help="keep each run's results here (default: a temp dir)")
    p.add_argument("--plot", default=None, help="PNG of the scaling curve (default: OUT/scaling.png)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--json", action="store_true")


def parse_seeds(text: str, first: int = 0) -> list[int]:
    text = str(text).strip()
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return list(range(first, first + max(1, int(text))))


def pooled_time_to(episodes: list[dict], threshold: float, window: int = WINDOW, hold: int = WINDOW):
    from fleetloop.stats import time_to_success
    return time_to_success(episodes, threshold, window=window, hold=hold)


def stats_of(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0, "n": len(values)}


def one_run(root: Path, seed: int, n: int, args) -> dict:
    from fleetloop import demo
    base = argparse.ArgumentParser()
    demo.add_arguments(base)
    argv = ["--robots", str(n), "--algo", args.algo, "--minutes", str(args.minutes), "--tasks", args.tasks,
            "--eval-episodes", "0", "--dashboard-port", "-1", "--control-hz", str(args.hz), "--seed", str(seed),
            "--pretrain-steps", str(args.pretrain_steps), "--out", str(root / f"seed-{seed}" / f"robots-{n}")]
    if args.demos_per_task is not None:
        argv += ["--demos-per-task", str(args.demos_per_task)]
    a = base.parse_args(argv)
    a.pretrained_dir = str(root / f"seed-{seed}" / "pretrained")  # one pretrained policy per seed, every fleet size
    if not args.no_early_stop:
        a.stop_when = lambda eps: pooled_time_to(eps, args.threshold, hold=args.hold) is not None
    t0 = time.time()
    res = demo.run_demo(a)
    episodes = json.loads((Path(a.out) / "episodes.json").read_text())
    t = pooled_time_to(episodes, args.threshold, hold=args.hold)
    first = pooled_time_to(episodes, args.threshold, hold=0)
    return {"time_to_threshold_s": None if t is None else round(t, 1), "reached": t is not None,
            "first_crossing_s": None if first is None else round(first, 1),
            "episodes": len(episodes), "versions_published": res["versions_published"],
            "autonomous_success_last_20": round(sum(e["autonomous_success"] for e in episodes[-WINDOW:])
                                                / max(1, len(episodes[-WINDOW:])), 3),
            "loop_s": res["wall_s"]["loop"], "stopped_early_at_s": res.get("stopped_early_at_s"),
            "robot_errors": res.get("robot_errors", {}),
            "demo_fleet_time_to_0_8_success_s": res.get("fleet_time_to_0_8_success_s"),
            "wall_s": round(time.time() - t0, 1)}


def summarise(sizes: list[int], seeds: list[int], per_seed_runs: dict, args, out: str, wall_s: float) -> dict:
    """per_seed_runs: {seed: {n: run dict}} -> the benchmark's JSON (pure: tested without runs)."""
    budget_s = args.minutes * 60
    first_n, last_n = sizes[0], sizes[-1]
    per_seed, speedups, lower = [], {n: [] for n in sizes}, {n: [] for n in sizes}
    for s in seeds:
        runs = per_seed_runs[s]
        times = {str(n): runs[n]["time_to_threshold_s"] for n in sizes}
        t1 = runs[first_n]["time_to_threshold_s"]
        sp, lb = {}, {}
        for n in sizes:
            tn = runs[n]["time_to_threshold_s"]
            sp[str(n)] = round(t1 / tn, 3) if t1 and tn else None
            if sp[str(n)] is not None:
                speedups[n].append(sp[str(n)])
            elif t1 is None and tn:  # the smallest fleet never got there within the budget
                lb[str(n)] = round(budget_s / tn, 3)
                lower[n].append(lb[str(n)])
        per_seed.append({"seed": s, "time_to_threshold_s": times,
                         "first_crossing_s": {str(n): runs[n].get("first_crossing_s") for n in sizes},
                         "speedup_vs_%d" % first_n: sp,
                         "speedup_lower_bound_vs_%d" % first_n: lb,
                         "episodes": {str(n): runs[n]["episodes"] for n in sizes}})
    head = stats_of(speedups[last_n])
    firsts = []  # the same ratio from first crossings, where both fleets crossed
    for s in seeds:
        f1, fn = (per_seed_runs[s][n].get("first_crossing_s") for n in (first_n, last_n))
        if f1 and fn:
            firsts.append(round(f1 / fn, 3))
    result = {"hz": args.hz, "budget_minutes": args.minutes, "threshold": args.threshold, "algo": args.algo,
              "window_episodes": WINDOW, "hold_episodes": args.hold,
              "success": "pooled fleet autonomous success (no takeover)",
              "sizes": sizes, "seeds": seeds, "early_stop": not args.no_early_stop,
              "speedup_of": f"{last_n} vs {first_n} robots",
              "speedup_mean": head["mean"], "speedup_min": head["min"], "speedup_max": head["max"],
              "speedup_std": head["std"], "speedup_seeds_counted": head["n"],
              "speedup_lower_bounds": lower[last_n],
              # the same ratio from first crossings (the pre-hold definition; optimistic), for comparison
              "speedup_first_crossing": stats_of(firsts),
              "speedup": {str(n): dict(stats_of(speedups[n]), lower_bounds=lower[n]) for n in sizes},
              "time_to_threshold_s": {str(n): dict(stats_of([per_seed_runs[s][n]["time_to_threshold_s"] for s in seeds
                                                             if per_seed_runs[s][n]["time_to_threshold_s"] is not None]),
                                                   censored=sum(per_seed_runs[s][n]["time_to_threshold_s"] is None
                                                                for s in seeds))
                                      for n in sizes},
              "per_seed": per_seed}
    runs = {}
    for n in sizes:  # the pre-seeds shape: runs[n] of the first seed, + the per-seed times
        r = dict(per_seed_runs[seeds[0]][n])
        r["speedup_vs_%d" % first_n] = per_seed[0]["speedup_vs_%d" % first_n][str(n)]
        r["time_to_threshold_s_per_seed"] = [per_seed_runs[s][n]["time_to_threshold_s"] for s in seeds]
        r["time_to_threshold_s_mean"] = result["time_to_threshold_s"][str(n)]["mean"]
        r["per_seed"] = {str(s): per_seed_runs[s][n] for s in seeds}
        runs[n] = r
    result.update({"runs": runs, "out": out, "wall_s": round(wall_s, 1)})
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    budget = result["budget_minutes"] * 60
    censored_labelled = False
    for k, n in enumerate(sizes):
        ts = [p["time_to_threshold_s"][str(n)] for p in result["per_seed"]]
        xs = [n * (1 + 0.03 * (j - (len(ts) - 1) / 2)) for j in range(len(ts))]
        ax1.scatter([x for x, t in zip(xs, ts) if t is not None], [t for t in ts if t is not None],
                    color="grey", s=14, zorder=3, label="a seed" if k == 0 else None)
        cens = [x for x, t in zip(xs, ts) if t is None]
        if cens:
            ax1.scatter(cens, [budget] * len(cens), marker="^", color="red", s=24, zorder=3,
                        label=None if censored_labelled else "a seed: not reached within the budget")
            censored_labelled = True
        st = result["time_to_threshold_s"][str(n)]
        if st["n"]:
            ax1.errorbar([n], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], fmt="o",
                         color="C0", capsize=5, zorder=4, label="mean, min-max over seeds" if k == 0 else None)
        sp = result["speedup"][str(n)]
        if sp["n"]:
            ax2.errorbar([n], [sp["mean"]], yerr=[[sp["mean"] - sp["min"]], [sp["max"] - sp["mean"]]], fmt="o",
                         color="C1", capsize=5, zorder=4, label="mean, min-max over seeds" if k == 0 else None)
        for p in result["per_seed"]:
            v = p["speedup_vs_%d" % sizes[0]][str(n)]
            if v is not None:
                ax2.scatter([n], [v], color="grey", s=14, zorder=3)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(sizes, [str(n) for n in sizes])
    ax1.set_xlabel("robots")
    hold = result.get("hold_episodes", 0)
    ax1.set_ylabel(f"time to fleet success {result['threshold']}" + (f", held {hold} episodes" if hold else "") + " (s)")
    ax1.set_title(f"time to {result['threshold']} ({result['hz']:.0f} Hz robots)")
    ax1.legend(fontsize=8)
    ax2.plot(sizes, [n / sizes[0] for n in sizes], ls=":", color="grey", label="linear")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sizes, [str(n) for n in sizes])
    ax2.set_xlabel("robots")
    ax2.set_ylabel(f"speed-up vs {sizes[0]} robot(s)")
    ax2.set_title(f"speed-up, {len(result['seeds'])} seed(s)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"fleetloop bench scaling: {result['algo']}, budget {result['budget_minutes']} min per run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    if not args.json:
        logging.basicConfig(level=logging.INFO)
    sizes = [int(x) for x in args.robots.split(",") if x.strip()]
    seeds = parse_seeds(args.seeds, args.seed)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fleetloop-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    per_seed_runs: dict = {}
    stdout, sys.stdout = sys.stdout, sys.stderr  # pretraining and the demo print progress; stdout is the JSON's
    try:
        for s in seeds:
            per_seed_runs[s] = {}
            for n in sizes:
                per_seed_runs[s][n] = one_run(root, s, n, args)
                log.info("seed %d, %d robot(s): %s", s, n, per_seed_runs[s][n])
    finally:
        sys.stdout = stdout
    result = summarise(sizes, seeds, per_seed_runs, args, str(root), time.time() - started)
    png = Path(args.plot) if args.plot else root / "scaling.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(result, png)
    result["plot"] = str(png)
    (root / "scaling.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
