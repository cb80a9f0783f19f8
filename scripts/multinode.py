#!/usr/bin/env python3
"""The learner across Ray nodes, on one machine: a Ray head and two worker nodes in network
namespaces, one worker node killed mid-training (docs/scale.md). The harness itself lives with
the test that runs it: tests/multinode_harness.py.

    sudo .venv/bin/python scripts/multinode.py            # prints a JSON summary, exit 0 if it held
    sudo .venv/bin/python scripts/multinode.py --cleanup  # remove what a killed run left behind
    sudo .venv/bin/python scripts/multinode.py --help     # every option
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from multinode_harness import main  # noqa: E402 -- after the path above

if __name__ == "__main__":
    sys.exit(main())
