"""Built-in question sets: benchmark folders a registered writer makes on demand, by name.

A question set is a folder in a benchmark's layout (for POPE: ``<split>.jsonl``, ``captions.jsonl``
and ``images/``). The library ships no images; a package above it registers writers with
:func:`register_question_set`. The package root registers ``zoo``, the shapes-world set the
organism cards are measured on, so the benchmarks can run with no downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# name -> writer(folder, n_images or None for the set's own default) -> the folder holding the set
QUESTION_SETS: dict[str, Callable[[Path, "int | None"], Path]] = {}
DEFAULT_SET = "zoo"


def register_question_set(name: str, write: Callable[[Path, "int | None"], Path]) -> None:
    """Make ``question_folder(name, out)`` write (or reuse) the set in ``out/<name>_set``."""
    QUESTION_SETS[name] = write


def question_folder(questions: "str | Path | None", out: "str | Path", n_images: int | None = None) -> Path:
    """The folder of ``questions``: a folder path as given, or a built-in set's name (``None``: the default set).

    ``n_images`` sizes a built-in set and is an error with a folder of one's own.
    """
    name = DEFAULT_SET if questions is None else str(questions)
    if name in QUESTION_SETS and not Path(name).is_dir():
        if n_images is not None and n_images < 1:
            raise ValueError(f"n_images {n_images} must be at least 1")
        return QUESTION_SETS[name](Path(out) / "pope_set", n_images)
    if questions is None:
        raise ValueError(f"no built-in question set {DEFAULT_SET!r} is registered; give questions=FOLDER")
    if n_images is not None:
        raise ValueError(f"n_images={n_images} sizes a built-in question set, but questions={str(questions)!r} is a "
                         "folder of your own; drop n_images")
    folder = Path(questions)
    if not folder.is_dir():
        raise FileNotFoundError(f"questions={str(questions)!r} is neither a folder nor a built-in set "
                                f"({', '.join(sorted(QUESTION_SETS)) or 'none registered'})")
    return folder


__all__ = ["QUESTION_SETS", "register_question_set", "question_folder"]
