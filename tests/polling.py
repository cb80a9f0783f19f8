"""Waiting in tests for something another thread or process does (shared test helper)."""
from __future__ import annotations

import time

import pytest


def wait_until(what: str, fn, timeout: float = 15.0, interval: float = 0.05):
    """Poll fn until it returns something truthy and return that; fail the test naming `what`
    once `timeout` seconds pass without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}")
