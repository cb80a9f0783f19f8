"""`fleetloop bench <name>`: benchmarks that print one JSON object. Each benchmark is a module
in this package with add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "ingest": "fleetloop.bench.ingest",
    "policy": "fleetloop.bench.policy",
    "jitter": "fleetloop.bench.jitter",
    "broadcast": "fleetloop.bench.broadcast",
    "scaling": "fleetloop.bench.scaling",
    "learner": "fleetloop.bench.learner",
    "rollout": "fleetloop.bench.rollout",
    "fleet": "fleetloop.bench.fleet",
    "learning": "fleetloop.bench.learning",
    "decode": "fleetloop.bench.decode",
    "gate": "fleetloop.bench.gate",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def run(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.name])
    sub = argparse.ArgumentParser(prog=f"fleetloop bench {args.name}")
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args.rest)) or 0)
