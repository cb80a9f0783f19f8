"""`fleetloop bench scaling --seeds N`: the JSON's shape (speed-up statistics, per-seed times to
the threshold, the pre-seeds `runs` keys) and the PNG next to it. No timed assertions: a tiny
budget checks wiring, not scaling."""
from __future__ import annotations

import argparse
import json

import pytest

from fleetloop.bench import scaling


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    scaling.add_arguments(p)
    argv = ["--out", str(tmp_path / "out"), "--json"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def _check_shape(doc: dict, sizes: list[int], seeds: list[int]) -> None:
    for key in ("speedup_mean", "speedup_min", "speedup_max", "speedup_std", "speedup_lower_bounds",
                "per_seed", "speedup", "time_to_threshold_s", "hz", "budget_minutes", "threshold", "algo", "runs",
                "out", "plot"):
        assert key in doc, key
    assert doc["sizes"] == sizes and doc["seeds"] == seeds
    assert [p["seed"] for p in doc["per_seed"]] == seeds
    for p in doc["per_seed"]:
        assert set(p["time_to_threshold_s"]) == {str(n) for n in sizes}
        assert set(p[f"speedup_vs_{sizes[0]}"]) == {str(n) for n in sizes}
    for n in sizes:  # the keys the single-seed bench always printed
        r = doc["runs"][str(n)]
        for key in ("time_to_threshold_s", "episodes", "versions_published", "autonomous_success_last_20",
                    f"speedup_vs_{sizes[0]}"):
            assert key in r, key
        assert len(r["time_to_threshold_s_per_seed"]) == len(seeds)
        assert set(doc["speedup"][str(n)]) >= {"mean", "min", "max", "std", "n"}


def test_parse_seeds():
    assert scaling.parse_seeds("3") == [0, 1, 2]
    assert scaling.parse_seeds("2", first=5) == [5, 6]
    assert scaling.parse_seeds("4,7") == [4, 7]


def test_statistics_and_plot_from_fake_runs(tmp_path, monkeypatch, capsys):
    """Times per seed -> speed-up mean/min/max over the seeds where both fleets got there; a seed
    where the single robot never did gives a lower bound, not a mean entry; the PNG is written."""
    times = {0: {1: 100.0, 2: 60.0, 4: 25.0}, 1: {1: 120.0, 2: 50.0, 4: 40.0}, 2: {1: None, 2: 90.0, 4: 30.0}}

    def fake_run(root, seed, n, args):
        t = times[seed][n]
        return {"time_to_threshold_s": t, "reached": t is not None, "episodes": 10 * n, "versions_published": 3,
                "first_crossing_s": None if t is None else t / 2,
                "autonomous_success_last_20": 0.5, "loop_s": 60.0, "stopped_early_at_s": t, "robot_errors": {},
                "demo_fleet_time_to_0_8_success_s": None, "wall_s": 1.0}

    monkeypatch.setattr(scaling, "one_run", fake_run)
    args = _args(tmp_path, robots="1,2,4", seeds=3, minutes=3)
    assert scaling.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    _check_shape(doc, [1, 2, 4], [0, 1, 2])
    assert doc["speedup_mean"] == pytest.approx((4.0 + 3.0) / 2, abs=1e-3)
    assert doc["speedup_min"] == pytest.approx(3.0) and doc["speedup_max"] == pytest.approx(4.0)
    assert doc["speedup_seeds_counted"] == 2
    assert doc["speedup_lower_bounds"] == [pytest.approx(180.0 / 30.0)]
    assert doc["time_to_threshold_s"]["1"]["censored"] == 1
    assert doc["per_seed"][2]["time_to_threshold_s"]["1"] is None
    assert doc["runs"]["4"]["time_to_threshold_s_per_seed"] == [25.0, 40.0, 30.0]
    assert doc["speedup_first_crossing"]["n"] == 2 and doc["speedup_first_crossing"]["mean"] == pytest.approx(3.5)
    png = tmp_path / "out" / "scaling.png"
    assert doc["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["speedup_mean"] == doc["speedup_mean"]


@pytest.mark.slow
def test_real_loop_tiny_budget(tmp_path, capsys, monkeypatch):
    """The real loop (pretraining, Ray learner, paced robots) with a tiny budget, 2 seeds x 2 fleet
    sizes: the JSON's shape and the plot at --plot; no figure is asserted."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plot = tmp_path / "fig" / "curve.png"
    args = _args(tmp_path, robots="1,2", seeds=2, minutes=0.1, tasks="reach-v3", demos_per_task=1,
                 pretrain_steps=5, plot=plot)
    assert scaling.run(args) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _check_shape(doc, [1, 2], [0, 1])
    assert doc["plot"] == str(plot) and plot.exists()
    for n in ("1", "2"):
        for s in ("0", "1"):
            assert doc["runs"][n]["per_seed"][s]["episodes"] > 0
            assert doc["runs"][n]["per_seed"][s]["robot_errors"] == {}


def test_time_to_threshold_must_hold_up():
    """A lucky window that crosses 0.8 and falls back does not count when --hold asks for the
    next episodes to be at the threshold too; the confirmed crossing's time is the crossing's."""
    from fleetloop.stats import time_to_success

    def eps(pattern):  # one episode per second, "1" = autonomous success
        return [{"t": float(i + 1), "autonomous_success": c == "1"} for i, c in enumerate(pattern)]

    lucky = "0000011111" + "0101010101" + "1111111111" + "1111111111"
    first = time_to_success(eps(lucky), 0.8, window=5, hold=0)
    held = time_to_success(eps(lucky), 0.8, window=5, hold=10)
    assert first == 9.0          # window 5..9 is 0,1,1,1,1 = 0.8: the first crossing
    # the crossings at t = 9-12 are followed by 0.5-0.6; the window 18..22 (1,0,1,1,1) crosses
    # at t = 22 and the ten episodes after it are all successes
    assert held == 22.0
    # a crossing near the end cannot be confirmed yet
    assert time_to_success(eps("0000011111"), 0.8, window=5, hold=10) is None
    assert time_to_success(eps("0000011111"), 0.8, window=5, hold=0) == 9.0
