"""Test helper shared by the deployment tests: read a compose-style .env file."""
from __future__ import annotations

from pathlib import Path

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def env_example(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=value lines, comments and blank lines skipped; anything else fails the test."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            out[key] = value
    return out
