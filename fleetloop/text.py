"""Text that reaches people: instructions, operator names, reasons.

Control characters are refused rather than stored: a NUL, an ESC sequence or CR/LF in an
instruction would reach the LeRobot export, the dashboard and the logs verbatim (a forged log line,
a terminal escape, a right-to-left override that shows "reach" for "hcaer"). Refused: the C0 and C1
controls with DEL (tab, CR and LF included), the line and paragraph separators, and the
bidirectional embedding / override / isolate marks.
"""
from __future__ import annotations

import re
from typing import Optional

_REFUSED = r"\x00-\x1F\x7F-\x9F\u061C\u200E\u200F\u2028\u2029\u202A-\u202E\u2066-\u2069"
_CONTROL = re.compile(f"[{_REFUSED}]")
PRINTABLE_PATTERN = f"^[^{_REFUSED}]*$"  # the same rule for a JSON schema (ECMA, Python and Rust regex alike)


def first_control(text: str) -> Optional[tuple[int, str]]:
    """(index, "U+XXXX") of the first refused character, or None."""
    m = _CONTROL.search(text)
    return (m.start(), f"U+{ord(m.group()):04X}") if m else None


def control_refusal(kind: str, text: str) -> Optional[str]:
    """The refusal message for `text`, or None when it is clean."""
    found = first_control(text)
    if found is None:
        return None
    i, code = found
    return f"{kind} has a control character ({code}) at character {i}; control, line-break and bidi characters are refused"
