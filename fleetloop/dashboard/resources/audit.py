"""The audit log: every operator action on AUDIT_STREAM, and its listing. The storage form (what
an entry may hold, how one is read back) is fleetloop.dashboard.audit.

AuditResource is one part of fleetloop.dashboard.service.Dashboard, which gives it redis."""
from __future__ import annotations

from typing import Optional

import redis

from fleetloop import config
from fleetloop.dashboard import audit as audit_form

AUDIT_MAXLEN = 100_000


class AuditResource:
    # ---- audit -----------------------------------------------------------------------------

    def audit(self, record: dict) -> None:
        """One entry on AUDIT_STREAM. Whatever a request carried, the entry is flat UTF-8 strings
        of bounded size with finite JSON numbers (fleetloop.dashboard.audit), so it can always be
        written and listed."""
        self.redis.xadd(config.AUDIT_STREAM, audit_form.encode_fields(record), maxlen=AUDIT_MAXLEN, approximate=True)

    def audit_log(self, limit: int = 100, before: Optional[str] = None) -> dict:
        """Newest first. No stored byte sequence fails the page: an entry is decoded leniently and
        cleaned (fleetloop.dashboard.audit.decode_entry); one that cannot be read at all (written by
        hand, by an older version, cut short) is listed as {"id", "unreadable": true, "raw": {...}}."""
        top = f"({before}" if before else "+"
        try:
            rows = self.redis.xrevrange(config.AUDIT_STREAM, max=top, min="-", count=limit)
        except redis.ResponseError:  # before=0-0 (nothing is older) or an id past the 64-bit range
            if before is None:
                raise
            rows = []
        entries = [audit_form.decode_entry(msg_id, fields) for msg_id, fields in rows]
        return {"entries": entries, "next_before": entries[-1]["id"] if len(entries) == limit else None}
