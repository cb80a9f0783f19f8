"""The audit log: every operator action on AUDIT_STREAM, and its listing.

AuditResource is one part of fleetloop.dashboard.service.Dashboard, which gives it redis."""
from __future__ import annotations

import json
import logging
import math
from typing import Optional

import redis

from fleetloop import config
from fleetloop.dashboard.resources.common import _s

log = logging.getLogger(__name__)

AUDIT_MAXLEN = 100_000


class AuditResource:
    # ---- audit -----------------------------------------------------------------------------

    def audit(self, record: dict) -> None:
        """One entry on AUDIT_STREAM. Whatever a request carried, the entry is flat strings of
        bounded size with finite JSON numbers, so it can always be written and read back."""
        fields = {}
        for k, v in record.items():
            if v is None:
                continue
            text = v if isinstance(v, str) else _safe_json(v)
            fields[str(k)[:64]] = text if len(text) <= AUDIT_FIELD_MAX else text[:AUDIT_FIELD_MAX - 3] + "..."
        self.redis.xadd(config.AUDIT_STREAM, fields, maxlen=AUDIT_MAXLEN, approximate=True)

    def audit_log(self, limit: int = 100, before: Optional[str] = None) -> dict:
        """Newest first. An entry that cannot be read (written by hand, by an older version, cut
        short) is listed as {"id", "unreadable": true, "raw": {...}} instead of failing the page."""
        top = f"({before}" if before else "+"
        try:
            rows = self.redis.xrevrange(config.AUDIT_STREAM, max=top, min="-", count=limit)
        except redis.ResponseError:  # before=0-0 (nothing is older) or an id past the 64-bit range
            if before is None:
                raise
            rows = []
        entries = []
        for msg_id, fields in rows:
            mid = _s(msg_id)
            try:
                f = {_s(k)[:64]: _s(v)[:AUDIT_FIELD_MAX] for k, v in fields.items()}
                for k in ("params", "status", "ts_ns"):
                    if k in f:
                        try:
                            f[k] = _finite(json.loads(f[k], parse_constant=lambda _c: None))
                        except (ValueError, RecursionError):
                            pass
                entries.append({"id": mid, **f})
            except Exception as err:  # one bad entry never breaks the listing
                log.warning("unreadable audit entry %s: %s", mid, err)
                entries.append({"id": mid, "unreadable": True,
                                "raw": {_s(k)[:64]: repr(v)[:200] for k, v in list(fields.items())[:20]}})
        return {"entries": entries, "next_before": entries[-1]["id"] if len(entries) == limit else None}


AUDIT_FIELD_MAX = 4096


def _finite(v, depth: int = 0):
    """A copy of parsed JSON with non-finite floats as None (JSON responses cannot carry them)."""
    if depth > 32:
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x, depth + 1) for x in v]
    return v


def _safe_json(v) -> str:
    try:
        return json.dumps(_finite(v), default=str, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):
        return json.dumps(repr(v)[:AUDIT_FIELD_MAX])
