"""The audit log's storage form, and the rule that a write is on it before its caller hears back.

Storing and listing. A request can carry any text JSON can spell -- lone surrogates ("\\ud800")
included, which Python holds in a str but UTF-8 cannot encode -- and an entry written by hand or
by an older version can hold any bytes. So every string is made *renderable* on the way in and
again on the way out: a lone surrogate becomes the six visible characters `\\ud800`, an
undecodable byte becomes `\\xff`, non-finite numbers become null. An entry is then flat UTF-8
strings of bounded size (encode_fields), and reading one back (decode_entry) always yields a
JSON-serialisable, UTF-8-encodable dict: no byte sequence in the stream can fail the listing.

Ordering. AuditedSend holds a write's response (status line and body) until the audit entry is
written, so a client that reads /api/audit right after its answer always finds its own entry.
"""
from __future__ import annotations

import json
import math
from typing import Awaitable, Callable

FIELD_MAX = 4096          # characters kept of one field
KEY_MAX = 64              # characters kept of one field name
PARSED_FIELDS = ("params", "status", "ts_ns")  # stored as JSON, listed parsed
_MAX_DEPTH = 32


def clean_text(s: str) -> str:
    """`s` with every lone surrogate spelled out as text (\\udXXX): always UTF-8 encodable."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def clean(v, depth: int = 0):
    """A copy of parsed JSON that any JSON encoder can write as UTF-8: strings (and keys)
    cleaned, non-finite floats as None, nesting cut at 32 levels."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(v, str):
        return clean_text(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {clean_text(str(k)): clean(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x, depth + 1) for x in v]
    if v is None or isinstance(v, (bool, int)):
        return v
    return clean_text(repr(v)[:FIELD_MAX])


def _bounded(text: str) -> str:
    return text if len(text) <= FIELD_MAX else text[:FIELD_MAX - 3] + "..."


def to_json(v) -> str:
    try:
        return json.dumps(clean(v), allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):
        return json.dumps(clean_text(repr(v)[:FIELD_MAX]))


def encode_fields(record: dict) -> dict[str, str]:
    """One audit entry as stream fields: UTF-8-encodable strings of bounded size (None dropped)."""
    fields = {}
    for k, v in record.items():
        if v is None:
            continue
        text = clean_text(v) if isinstance(v, str) else to_json(v)
        fields[clean_text(str(k))[:KEY_MAX]] = _bounded(text)
    return fields


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")  # any bytes: \xNN for what is not UTF-8
    return clean_text("" if v is None else str(v))


def decode_entry(msg_id, fields: dict) -> dict:
    """One stream entry as a listing row, whatever it holds: {"id", field: value...}, the JSON
    fields parsed when they parse. Never raises, always renderable."""
    mid = _text(msg_id)
    try:
        row = {_text(k)[:KEY_MAX]: _text(v)[:FIELD_MAX] for k, v in fields.items()}
        for k in PARSED_FIELDS:
            if k in row:
                try:
                    row[k] = clean(json.loads(row[k], parse_constant=lambda _c: None))
                except (ValueError, RecursionError):
                    pass
        row.pop("id", None)
        entry = {"id": mid, **row}
        json.dumps(entry, ensure_ascii=False, allow_nan=False).encode("utf-8")  # proves it renders
        return entry
    except Exception:  # belt and braces: the row is unreadable, the listing is not
        return {"id": mid, "unreadable": True,
                "raw": {repr(k)[:KEY_MAX]: repr(v)[:200] for k, v in list(fields.items())[:20]}}


class AuditedSend:
    """An ASGI `send` that holds a response until `write_audit(status, error_body)` has run.

    The status line and body messages are kept back (a write's answer is a small JSON body;
    past `hold_max` bytes the entry is written and the rest streams through) and released after
    the audit entry is on the stream. If the app fails before finishing its answer, `finish()`
    writes the entry; the caller then re-raises and the server answers 500 after it."""

    def __init__(self, send, write_audit: Callable[[int, bytes], Awaitable[None]], hold_max: int = 1 << 20):
        self._send, self._write_audit, self.hold_max = send, write_audit, hold_max
        self.status = 500
        self.error_body = bytearray()
        self._held: list = []
        self._held_bytes = 0
        self.audited = False

    async def __call__(self, message) -> None:
        if self.audited:
            return await self._send(message)
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if self.status >= 400 and len(self.error_body) < 4096:
                self.error_body.extend(chunk[: 4096 - len(self.error_body)])
            self._held_bytes += len(chunk)
        self._held.append(message)
        last = message["type"] == "http.response.body" and not message.get("more_body", False)
        if last or self._held_bytes > self.hold_max:
            await self.finish()

    async def finish(self, release: bool = True) -> None:
        """Write the audit entry (once), then release what was held (release=False: the app
        failed, the server will answer 500 itself, so a half answer is dropped)."""
        if not self.audited:
            self.audited = True
            await self._write_audit(self.status, bytes(self.error_body))
        held, self._held = self._held, []
        if release:
            for m in held:
                await self._send(m)
