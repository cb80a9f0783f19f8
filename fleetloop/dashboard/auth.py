"""Who may do what on the dashboard: bearer tokens, two roles.

  operator  reads and every write (takeover, labels, promote, pin, rollback, canary)
  viewer    reads only

Tokens come from (merged; a name or token may appear once):
  FLEETLOOP_OPERATOR_TOKENS / FLEETLOOP_VIEWER_TOKENS   "alice:<token>,bob:<token>"
  a file (--tokens PATH or FLEETLOOP_TOKENS_FILE), JSON or TOML (by extension):
      {"operators": {"alice": "<token>"}, "viewers": {"wallboard": "<token>"}}
      [operators]
      alice = "<token>"

Tokens are compared in constant time and never logged; the name is what the audit log records.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

OPERATOR, VIEWER = "operator", "viewer"
_RANK = {VIEWER: 1, OPERATOR: 2}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_TOKEN_LEN = 12  # short tokens are guessable; refuse them rather than run with one


class TokenConfigError(ValueError):
    """The token configuration is unusable; the message says which entry and why."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    def can(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


ANONYMOUS = Identity("anonymous", "")


class TokenTable:
    def __init__(self):
        self._entries: list[tuple[bytes, Identity]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, token: str, role: str, where: str = "") -> None:
        where = f" ({where})" if where else ""
        if role not in _RANK:
            raise TokenConfigError(f"unknown role {role!r}{where}: use {OPERATOR!r} or {VIEWER!r}")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise TokenConfigError(f"bad token name {name!r}{where}: letters, digits, '.', '_', '@', '-'")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LEN or any(c.isspace() for c in token):
            raise TokenConfigError(f"token for {name!r}{where} must be at least {MIN_TOKEN_LEN} characters "
                                   f"without whitespace")
        for known, ident in self._entries:
            if hmac.compare_digest(known, token.encode()):
                raise TokenConfigError(f"token for {name!r}{where} is already used by {ident.name!r}")
            if ident.name == name:
                raise TokenConfigError(f"token name {name!r}{where} appears twice")
        self._entries.append((token.encode(), Identity(name, role)))

    def lookup(self, token: Optional[str]) -> Optional[Identity]:
        """The identity for a presented token, or None. Compares against every entry so the
        time taken does not say how far a guess got."""
        if not token:
            return None
        presented = token.encode()
        found = None
        for known, ident in self._entries:
            if hmac.compare_digest(known, presented):
                found = ident
        return found

    def names(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {OPERATOR: [], VIEWER: []}
        for _t, ident in self._entries:
            out[ident.role].append(ident.name)
        return out


def parse_pairs(text: str, role: str, table: TokenTable, where: str) -> None:
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, token = item.partition(":")
        if not sep:
            raise TokenConfigError(f"{where} entry {i + 1} is not name:token")
        table.add(name.strip(), token.strip(), role, where)


def load_file(path: str | os.PathLike, table: TokenTable) -> None:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TokenConfigError(f"cannot read token file {p}: {e}") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib  # Python 3.11+
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise TokenConfigError(f"{p}: TOML needs Python 3.11+; use a .json file") from None
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise TokenConfigError(f"cannot parse token file {p}: {e}") from None
    if not isinstance(data, dict) or not set(data) <= {"operators", "viewers"}:
        raise TokenConfigError(f"{p}: expected only 'operators' and 'viewers' tables (name -> token)")
    for key, role in (("operators", OPERATOR), ("viewers", VIEWER)):
        section = data.get(key, {})
        if not isinstance(section, dict):
            raise TokenConfigError(f"{p}: '{key}' must map names to tokens")
        for name, token in section.items():
            table.add(name, token, role, f"{p} [{key}]")


def load_tokens(path: str | None = None, environ: Optional[dict] = None) -> TokenTable:
    env = os.environ if environ is None else environ
    table = TokenTable()
    path = path or env.get("FLEETLOOP_TOKENS_FILE") or None
    if path:
        load_file(path, table)
    for var, role in (("FLEETLOOP_OPERATOR_TOKENS", OPERATOR), ("FLEETLOOP_VIEWER_TOKENS", VIEWER)):
        if env.get(var):
            parse_pairs(env[var], role, table, var)
    return table


def generated_operator_token() -> str:
    return secrets.token_urlsafe(24)


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token from an 'Authorization: Bearer <token>' header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
