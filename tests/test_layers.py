"""The package's layers: imports point down only (the contract is [tool.importlinter] in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports() -> Path:
    """The ``lint-imports`` command of this environment, with an error naming the fix when it is missing."""
    command = Path(sys.executable).parent / "lint-imports"
    assert command.exists(), (
        f"{command} not found; install the development extra (pip install -e '.[dev]'), which brings import-linter"
    )
    return command


def test_imports_point_down_the_layers():
    result = subprocess.run([str(lint_imports()), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (
        "an import breaks the layers contract in pyproject.toml ([tool.importlinter]); move the code down a layer "
        "or, if it is a known violation to fix later, list it under ignore_imports with the reason:\n"
        + result.stdout + result.stderr
    )
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout
