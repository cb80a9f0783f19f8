"""What every part of the dashboard's model shares: the errors the API maps to status codes, and
the small converters for what Redis hands back."""
from __future__ import annotations


class NotFound(LookupError):
    """An unknown robot, episode, version, step or camera (the API answers 404)."""

    def __init__(self, kind: str, key: str, why: str = ""):
        super().__init__(f"unknown {kind} {key!r}" + (f": {why}" if why else ""))
        self.kind, self.key = kind, key

    def __str__(self) -> str:
        return self.args[0]


class NotDelivered(RuntimeError):
    """A control command reached no daemon (the robot is offline); nothing was applied."""


class BadRequest(ValueError):
    """A request that is well-formed but cannot be applied as asked (the API answers 422)."""


class CannotApply(RuntimeError):
    """A valid request the fleet's present state does not allow (the API answers 409)."""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

