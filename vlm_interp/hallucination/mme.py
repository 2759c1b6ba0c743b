"""MME's hallucination subsets (existence, count, position, colour): its question files and acc / acc+.

Two layouts are read, per subtask:

- the release folder (``MME_Benchmark_release_version/<subtask>/``): each image ``NAME.jpg`` (or .png)
  next to ``NAME.txt``, or in ``images/`` with ``questions_answers_YN/NAME.txt``; the text file holds one
  question per line, ``question<TAB>Yes|No``;
- the evaluation tool's per-subtask file ``<subtask>.txt``: one line per question,
  ``image<TAB>question<TAB>Yes|No``, with the images in ``<subtask>/`` (or ``<subtask>/images/``).

Each image has two questions, one answered "Yes" and one "No". Metrics are MME's: ``acc`` (questions
answered right), ``acc_plus`` (images with both questions right) and ``score = 100 * (acc + acc_plus)``
per subtask (at most 200); the hallucination total is the sum over subtasks. Answers are read with
MME's rule (:func:`parse_mme`). Readers are tested on files written from this layout, not on the real
(undownloadable here) release.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import VLMInterpError
from .stats import bootstrap_ci

SUBTASKS = ("existence", "count", "position", "color")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class MmeFormatError(VLMInterpError, ValueError):
    """An MME question file is malformed, or an image or its second question is missing."""


@dataclass(frozen=True)
class MmeItem:
    """One MME question; ``image`` is relative to the set's folder, ``question_id`` counts within the subtask."""

    subtask: str
    question_id: int
    image: str
    text: str
    label: str


def _label(answer: str, where: str) -> str:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise MmeFormatError(f"{where}: answer {answer.strip()!r} must be Yes or No")
    return label


def _split(line: str, n: int, where: str, layout: str) -> list[str]:
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != n:
        raise MmeFormatError(f"{where}: expected {layout} separated by tabs, got {len(parts)} field(s)")
    return parts


def _lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield number, line


def _image_of(folder: Path, stem: str) -> Path | None:
    for place in (folder, folder / "images"):
        for suffix in IMAGE_SUFFIXES:
            if (place / (stem + suffix)).exists():
                return place / (stem + suffix)
    return None


def _release(root: Path, subtask: str) -> list[tuple[str, str, str, str]]:
    """(image, question, label, where) of one subtask in the release layout."""
    folder = root / subtask
    qa = folder / "questions_answers_YN"
    texts = sorted((qa if qa.is_dir() else folder).glob("*.txt"))
    if not texts:
        raise MmeFormatError(f"{folder}: no question files (NAME.txt next to NAME.jpg, or questions_answers_YN/)")
    out = []
    for text in texts:
        image = _image_of(folder, text.stem)
        if image is None:
            raise MmeFormatError(f"{text}: no image {text.stem}{IMAGE_SUFFIXES} in {folder} or {folder / 'images'}")
        for number, line in _lines(text):
            where = f"{text}:{number}"
            question, answer = _split(line, 2, where, "question and answer")
            out.append((image.relative_to(root).as_posix(), question, _label(answer, where), where))
    return out


def _tool_file(root: Path, subtask: str) -> list[tuple[str, str, str, str]]:
    """(image, question, label, where) of one subtask in the evaluation tool's layout."""
    path = root / f"{subtask}.txt"
    out = []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        name, question, answer = _split(line, 3, where, "image, question and answer")
        image = next((p for p in (root / subtask / name, root / subtask / "images" / name) if p.exists()), None)
        if image is None:
            raise MmeFormatError(f"{where}: image {name!r} not found in {root / subtask} or {root / subtask / 'images'}")
        out.append((image.relative_to(root).as_posix(), question, _label(answer, where), where))
    return out


def read_mme(folder: "str | Path", subtasks: Sequence[str] = SUBTASKS) -> list[MmeItem]:
    """The questions of ``subtasks`` in an MME folder (either layout; see the module docstring)."""
    root = Path(folder)
    items = []
    for subtask in subtasks:
        if (root / f"{subtask}.txt").is_file():
            rows = _tool_file(root, subtask)
        elif (root / subtask).is_dir():
            rows = _release(root, subtask)
        else:
            raise MmeFormatError(f"{root}: no MME subtask {subtask!r} ({subtask}.txt or a folder {subtask}/)")
        by_image: dict[str, list[tuple[str, str, str, str]]] = {}
        counted = 0
        for row in rows:
            by_image.setdefault(row[0], []).append(row)
        for image, questions in by_image.items():
            if sorted(q[2] for q in questions) != ["no", "yes"]:
                raise MmeFormatError(f"{questions[0][3]}: image {image} has answers {[q[2] for q in questions]}; "
                                     "MME asks two questions per image, one answered Yes and one No")
            for _, question, label, _ in questions:
                counted += 1
                items.append(MmeItem(subtask, counted, image, question, label))
    return items


def parse_mme(text: str) -> str:
    """MME's reading of an answer: "yes"/"no" as such, else "yes" or "no" among its first 4 characters
    (lowercased; "yes" checked first), else "other" (counted wrong)."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _acc(rows: np.ndarray) -> float:
    return float(rows[:, :2].sum() / (2 * len(rows))) if len(rows) else float("nan")


def _acc_plus(rows: np.ndarray) -> float:
    return float((rows[:, :2].sum(1) == 2).mean()) if len(rows) else float("nan")


def mme_metrics(frame: pd.DataFrame, column: str = "parsed", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """acc, acc+ and score per subtask (and their sum, ``total``), with bootstrap intervals over images.

    ``frame`` has one row per question with ``subtask``, ``image``, ``label`` and the answer in ``column``.
    """
    rows = []
    for subtask, group in frame.groupby("subtask", sort=False):
        right = (group[column] == group["label"]).groupby(group["image"]).agg(list)
        if not all(len(r) == 2 for r in right):
            raise MmeFormatError(f"MME {subtask}: every image needs exactly its two answers for acc+")
        table = np.array([[int(a), int(b)] for a, b in right], dtype=float).reshape(-1, 2)
        out = {"subtask": subtask, "images": len(table), "n": 2 * len(table), "acc": _acc(table),
               "acc_plus": _acc_plus(table)}
        out["score"] = 100 * (out["acc"] + out["acc_plus"])
        for name, fn in (("acc", _acc), ("acc_plus", _acc_plus), ("score", lambda t: 100 * (_acc(t) + _acc_plus(t)))):
            out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap_ci(table, fn, n_boot=n_boot, seed=seed)
        rows.append(out)
    result = pd.DataFrame(rows)
    if len(result):
        total = {"subtask": "total", "images": int(result["images"].sum()), "n": int(result["n"].sum()),
                 "score": float(result["score"].sum())}
        result = pd.concat([result, pd.DataFrame([total])], ignore_index=True)
    return result


def tool_lines(frame: pd.DataFrame, subtask: str, column: str = "answer_text") -> str:
    """Answers of one subtask in the evaluation tool's result layout: ``image<TAB>question<TAB>Yes|No<TAB>answer``."""
    lines = []
    for row in frame[frame["subtask"] == subtask].itertuples(index=False):
        answer = " ".join(str(getattr(row, column)).split())
        lines.append(f"{Path(row.image).name}\t{row.text}\t{row.label.capitalize()}\t{answer}")
    return "\n".join(lines) + "\n"


__all__ = ["SUBTASKS", "MmeItem", "MmeFormatError", "read_mme", "parse_mme", "mme_metrics", "tool_lines"]
