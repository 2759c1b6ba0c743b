"""Files: JSON-lines reading whose errors name file and line, atomic writes (never half-written), and the
settings a resumable folder's results were made with."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ResumeError


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


def jsonl_text(rows: Iterable[dict]) -> str:
    """JSON lines, one object per line."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: "str | Path") -> Iterator[Path]:
    """A temporary file beside ``path`` to write into; moved over ``path`` only if the body succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: "str | Path", data: "str | bytes") -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def changed_settings(recorded: dict, wanted: dict) -> str:
    """'' when ``recorded`` holds every setting of ``wanted`` unchanged, else ``key=old (now new)`` for each change."""
    return ", ".join(f"{key}={recorded.get(key, '(not recorded)')!r} (now {value!r})"
                     for key, value in wanted.items() if recorded.get(key) != value)


def check_settings(folder: "str | Path", settings: dict, error: type[Exception] = ResumeError,
                   fix: str = "use another folder") -> None:
    """Record ``settings`` in ``folder/settings.json``, or check that a resumed folder was made with them.

    A folder that already holds results but no record (made before records were kept), or a record
    that differs, raises ``error`` naming each setting that changed, so that a rerun with other
    settings never silently reuses results made another way.
    """
    folder = Path(folder)
    record = folder / "settings.json"
    if record.exists():
        recorded = json.loads(record.read_text(encoding="utf-8"))
    elif folder.exists() and any(folder.iterdir()):
        recorded = {}
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(record, json.dumps(settings, indent=1))
        return
    changed = changed_settings(recorded, settings)
    if changed:
        raise error(f"{folder} holds results made with other settings: {changed}; {fix}, or delete {folder} "
                    "to start over")
