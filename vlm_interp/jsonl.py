"""Reading JSON-lines files whose errors name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def jsonl_rows(path: "str | Path", error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for every non-blank line; malformed lines raise ``error`` naming them."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row
