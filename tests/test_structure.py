"""What a newcomer meets: no product module over 600 lines unless its docstring says why (issue 21)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("fleetloop", "actor", "buffer", "learner")
MAX_LINES = 600


def long_modules_without_a_reason(root: Path = REPO) -> list[str]:
    out = []
    for d in PRODUCT_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            if len(text.splitlines()) <= MAX_LINES:
                continue
            doc = ast.get_docstring(ast.parse(text)) or ""
            if f"{MAX_LINES} lines" not in doc:
                out.append(f"{rel}: {len(text.splitlines())} lines")
    return out


def test_long_modules_say_why():
    assert long_modules_without_a_reason() == []


def test_the_check_sees_a_long_module_without_a_reason(tmp_path):
    (tmp_path / "fleetloop").mkdir()
    (tmp_path / "fleetloop" / "big.py").write_text('"""A module."""\n' + "x = 1\n" * MAX_LINES)
    (tmp_path / "fleetloop" / "said.py").write_text(f'"""Over {MAX_LINES} lines on purpose: one state machine."""\n'
                                                    + "x = 1\n" * MAX_LINES)
    assert long_modules_without_a_reason(tmp_path) == [f"fleetloop/big.py: {MAX_LINES + 1} lines"]
