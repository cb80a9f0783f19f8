"""The `fleetloop` command. Each subcommand lives in its own module, imported only when run,
so `fleetloop actor` on a robot never imports Ray and `fleetloop bench ingest` never imports
MuJoCo. A module provides `add_arguments(parser)` and `run(args) -> int | None`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fleetloop.demo", "run the whole loop on this machine: store, Redis, Ray learner, simulated robots"),
    "up": ("fleetloop.up", "run the cloud side (learner + dashboard) against configured Redis/store"),
    "learner": ("fleetloop.learner.main", "run the Ray learner (consume episodes, train, publish weights)"),
    "actor": ("fleetloop.actor.daemon", "run the actor daemon on a robot (gRPC robot link, spool, uploader)"),
    "dashboard": ("fleetloop.dashboard.app", "run the operator dashboard (REST API + web page)"),
    "collect": ("fleetloop.actor.sim.collect", "record expert demonstrations into the store (offline buffer)"),
    "pretrain": ("fleetloop.policy.pretrain", "behaviour-clone a policy (any backend) on the offline demonstrations"),
    "vla": ("fleetloop.policy.hf_vla.cli", "Hugging Face VLM bases: make-tiny, provision, digest, bake (expert into the base)"),
    "eval": ("fleetloop.actor.sim.evaluate", "evaluate a policy on simulated tasks (success with Wilson 95%% intervals)"),
    "export": ("fleetloop.lerobot.export", "export fleet episodes as a LeRobot v3 dataset"),
    "import": ("fleetloop.lerobot.importer", "import a LeRobot v3 dataset into the offline buffer"),
    "ingest": ("fleetloop.ingest", "the robot write gate: robots' episode events, heartbeats and acks, checked"),
    "credentials": ("fleetloop.credentials", "per-robot Redis ACL users, S3/MinIO policies and policy-signing keys"),
    "bench": ("fleetloop.bench", "benchmarks that print JSON (ingest, policy, broadcast, scaling, ...)"),
}


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """--help names every option's default, also where the option has no help text (argparse's
    ArgumentDefaultsHelpFormatter only annotates options that have one)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)
            continue
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS, []):
            continue
        if not action.help:
            action.help = "(default: %(default)s)"
        elif "%(default)" not in action.help and "default" not in action.help.lower():
            action.help += " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetloop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    module_name, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"fleetloop {args.command}", description=help_text)
    module.add_arguments(sub)
    _show_defaults(sub)
    sub_args = sub.parse_args(rest)
    code = module.run(sub_args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
