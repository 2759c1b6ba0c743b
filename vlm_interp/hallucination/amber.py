"""AMBER: its query and annotation files, both parts, and their metrics, with no LLM and no spaCy.

AMBER's data folder (``junyangwang0410/AMBER``, ``data/``) holds:

- ``query/query_all.json`` (and per-part ``query_generative.json``, ``query_discriminative*.json``): a JSON
  array of ``{"id", "image", "query"}``;
- ``annotations.json``: a JSON array indexed by the same ids. Generative entries (ids 1-1004) are
  ``{"id", "type": "generative", "truth": [objects], "hallu": [objects people tend to hallucinate]}``;
  discriminative ones are ``{"id", "type", "truth": "yes" | "no"}`` with type
  ``discriminative-hallucination`` (existence), ``discriminative-attribute-state|number|action``
  (attribute), ``discriminative-relation`` or ``relation`` (relation);
- ``relation.json``: each object word to its associated words (synonyms, near-synonyms);
- ``safe_words.txt``: words never counted as objects.

Images live in a folder of their own (``image/AMBER_1.jpg``, ...).

Discriminative metrics are AMBER's: accuracy, and precision, recall and F1 with **"no" as the positive
class**, per dimension (existence, attribute, relation) and overall. Generative metrics are CHAIR
(hallucinated object mentions / object mentions, pooled), Cover (annotated objects mentioned / annotated
objects), Hal (responses with at least one hallucinated object) and Cog (hallucination-prone objects of the
``hallu`` list mentioned / those objects). AMBER's own extraction tags nouns with nltk, lemmatises them and
matches near-synonyms by spaCy ``en_core_web_lg`` vector similarity (> 0.8). Ours matches the words of
``relation.json`` and their regular plurals in the text (see :class:`AmberVocabulary`): it has no
similarity step, so generative numbers are **not comparable with published AMBER numbers** until the
official extractor is run on the same responses. Readers are tested on files written from this layout,
not on the real (undownloadable here) release.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import VLMInterpError
from .chair import _plurals
from .stats import bootstrap_ci

DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
    "discriminative-relation": "relation",
    "relation": "relation",
}
GENERATIVE = "generative"
QUERY_FILE = "query/query_all.json"
IMAGES = "image"


class AmberFormatError(VLMInterpError, ValueError):
    """An AMBER file is malformed, or queries and annotations do not match."""


@dataclass(frozen=True)
class AmberItem:
    """One AMBER query joined with its annotation."""

    id: int
    image: str
    query: str
    type: str
    truth: "str | tuple[str, ...]"  # "yes"/"no" (discriminative) or the objects present (generative)
    hallu: tuple[str, ...] = ()

    @property
    def generative(self) -> bool:
        return self.type == GENERATIVE

    @property
    def dimension(self) -> str:
        return GENERATIVE if self.generative else DIMENSIONS[self.type]


def json_array(path: "str | Path", error: type[Exception] = AmberFormatError) -> list[tuple[int, object]]:
    """``(line number, element)`` of every element of a JSON array file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def line(at: int) -> int:
        return text.count("\n", 0, at) + 1

    at = len(text) - len(text.lstrip())
    if not text[at:at + 1] == "[":
        raise error(f"{path}:{line(at)}: expected a JSON array ([...])")
    at += 1
    out: list[tuple[int, object]] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if text[at:at + 1] == "]" and not out:
            return out
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{line(at)}: not valid JSON ({err.msg})") from None
        out.append((line(at), value))
        at = end
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if text[at:at + 1] == "]":
            return out
        if text[at:at + 1] != ",":
            raise error(f"{path}:{line(at)}: expected ',' or ']' after an array element")
        at += 1


def _annotations(path: Path) -> dict[int, tuple[int, dict]]:
    out: dict[int, tuple[int, dict]] = {}
    for number, row in json_array(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict) or "id" not in row or "type" not in row or "truth" not in row:
            raise AmberFormatError(f"{where}: not an AMBER annotation; expected an object with id, type, truth")
        kind, truth = row["type"], row["truth"]
        if kind == GENERATIVE:
            if not (isinstance(truth, list) and isinstance(row.get("hallu", []), list)):
                raise AmberFormatError(f"{where}: a generative annotation has lists 'truth' and 'hallu'")
        elif kind in DIMENSIONS:
            if truth not in ("yes", "no"):
                raise AmberFormatError(f"{where}: truth {truth!r} of a {kind} question must be 'yes' or 'no'")
        else:
            raise AmberFormatError(f"{where}: unknown type {kind!r}; AMBER types are "
                                   f"{[GENERATIVE, *DIMENSIONS]}")
        if int(row["id"]) in out:
            raise AmberFormatError(f"{where}: id {row['id']} repeats (first at line {out[int(row['id'])][0]})")
        out[int(row["id"])] = (number, row)
    return out


def read_amber(queries: "str | Path", annotations: "str | Path", images: "str | Path | None" = None,
               dimensions: Sequence[str] | None = None) -> list[AmberItem]:
    """AMBER queries joined with their annotations (only ``dimensions``, e.g. ``["existence"]``, if given).

    Every query needs an annotation with its id; errors name the file and line. With ``images``
    every referenced image must exist.
    """
    queries, annotations = Path(queries), Path(annotations)
    known = {GENERATIVE, *DIMENSIONS.values()}
    if dimensions is not None and not set(dimensions) <= known:
        raise AmberFormatError(f"unknown AMBER dimension(s) {sorted(set(dimensions) - known)}; "
                               f"choose from {sorted(known)}")
    notes = _annotations(annotations)
    items, seen = [], set()
    for number, row in json_array(queries):
        where = f"{queries}:{number}"
        try:
            qid, image, query = int(row["id"]), str(row["image"]), str(row["query"])
        except (KeyError, TypeError, ValueError) as err:
            raise AmberFormatError(f"{where}: not an AMBER query ({type(err).__name__}: {err}); "
                                   "expected id, image, query") from None
        if qid in seen:
            raise AmberFormatError(f"{where}: query id {qid} repeats")
        seen.add(qid)
        if qid not in notes:
            raise AmberFormatError(f"{where}: query {qid} has no annotation in {annotations}")
        note = notes[qid][1]
        truth = tuple(str(t) for t in note["truth"]) if note["type"] == GENERATIVE else note["truth"]
        item = AmberItem(qid, image, query, note["type"], truth, tuple(str(h) for h in note.get("hallu", [])))
        if dimensions is not None and item.dimension not in dimensions:
            continue
        if images is not None and not (Path(images) / image).exists():
            raise AmberFormatError(f"{where}: image {image!r} not found in {images}")
        items.append(item)
    return items


def read_amber_folder(folder: "str | Path", dimensions: Sequence[str] | None = None,
                      query_file: str = QUERY_FILE) -> tuple[list[AmberItem], "AmberVocabulary"]:
    """Items and vocabulary of a folder in AMBER's data layout, with its images in ``image/``."""
    folder = Path(folder)
    items = read_amber(folder / query_file, folder / "annotations.json", folder / IMAGES, dimensions)
    return items, AmberVocabulary.load(folder / "relation.json", folder / "safe_words.txt")


# ---- discriminative part ---------------------------------------------------------------------------
def amber_binary(pred: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """AMBER's discriminative metrics: accuracy, and precision/recall/F1 with "no" as the positive class.

    An answer other than "yes" or "no" is wrong whatever the truth (AMBER compares the strings). Precision
    is 0 when nothing is answered "no"; every rate of an empty input is NaN. AMBER's script adds
    1e-4 to F1's denominator; we do not (F1 is 0 when precision and recall are).
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    p, g = np.asarray(pred, dtype=object), np.asarray(gold, dtype=object)
    said_no, is_no = p == "no", g == "no"
    hit = int((said_no & is_no).sum())
    nan = float("nan")
    precision = hit / said_no.sum() if said_no.any() else (0.0 if len(p) else nan)
    recall = hit / is_no.sum() if is_no.any() else (0.0 if len(p) else nan)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else (0.0 if len(p) else nan)
    return {"n": len(g), "accuracy": float((p == g).mean()) if len(g) else nan, "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "no_ratio": float(said_no.mean()) if len(p) else nan}


def amber_binary_with_ci(pred: Sequence[str], gold: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`amber_binary` plus ``<metric>_lo``/``_hi`` bootstrap bounds (questions resampled)."""
    out = amber_binary(pred, gold)
    pairs = np.array(list(zip(pred, gold)), dtype=object).reshape(-1, 2)
    for key in ("accuracy", "precision", "recall", "f1"):
        out[f"{key}_lo"], out[f"{key}_hi"] = bootstrap_ci(
            pairs, lambda rows, key=key: amber_binary(rows[:, 0], rows[:, 1])[key], n_boot=n_boot, seed=seed)
    return out


# ---- generative part -------------------------------------------------------------------------------
@dataclass
class AmberVocabulary:
    """AMBER's object words (``relation.json``: word -> associated words) and its safe words."""

    association: dict[str, list[str]]
    safe: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, relation: "str | Path", safe_words: "str | Path | None" = None) -> "AmberVocabulary":
        data = dict(json_array_object(relation))
        safe = set()
        if safe_words is not None and Path(safe_words).exists():
            safe = {w.strip().lower() for w in Path(safe_words).read_text(encoding="utf-8").splitlines() if w.strip()}
        return cls(data, safe)

    def __post_init__(self) -> None:
        words = {w.lower() for k, vs in self.association.items() for w in [k, *vs]}
        forms: dict[str, str] = {}
        for word in words:
            for form in _plurals(word):
                forms.setdefault(form, word)
        ordered = sorted(forms, key=lambda f: (-len(f.split()), -len(f)))
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(f) for f in ordered) + r")\b") if ordered else None
        self._forms = forms

    def mentions(self, text: str) -> list[str]:
        """Object words of the vocabulary in ``text`` (singular), in order, once per mention, safe words left out."""
        if self._pattern is None:
            return []
        found = [self._forms[m.group(1)] for m in self._pattern.finditer(text.lower())]
        return [w for w in found if w not in self.safe]

    def related(self, objects: Sequence[str]) -> dict[str, int]:
        """Each word naming one of ``objects`` (the object itself or an associated word) -> the object's index."""
        out: dict[str, int] = {}
        for k, obj in enumerate(objects):
            for word in [obj, *self.association.get(obj, [])]:
                out.setdefault(word.lower(), k)
        return out


def json_array_object(path: "str | Path") -> dict[str, list[str]]:
    """``relation.json``: a JSON object from words to lists of words."""
    path = Path(path)
    if not path.is_file():
        raise AmberFormatError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AmberFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise AmberFormatError(f"{path}: expected a JSON object mapping each word to a list of associated words")
    return {str(k): [str(w) for w in v] for k, v in data.items()}


def amber_generative_scores(responses: Sequence[str], items: Sequence[AmberItem],
                            vocab: AmberVocabulary) -> pd.DataFrame:
    """Per response: object mentions, hallucinated mentions, annotated objects covered, ``hallu`` objects hit.

    A mention of an annotated object (or of a word associated with it) is safe and covers that object;
    any other mention is a hallucination, and one that names a ``hallu`` object (or an associated word)
    also counts towards Cog.
    """
    rows = []
    for text, item in zip(responses, items, strict=True):
        if not item.generative:
            raise AmberFormatError(f"AMBER query {item.id} is a {item.type} question, not a generative one")
        safe, prone = vocab.related(item.truth), vocab.related(item.hallu)
        mentioned = vocab.mentions(text)
        covered, hit, hallucinated = set(), set(), []
        for word in mentioned:
            if word in safe:
                covered.add(safe[word])
                continue
            hallucinated.append(word)
            if word in prone:
                hit.add(prone[word])
        rows.append({"id": item.id, "response": text, "mentions": mentioned, "hallucinated": hallucinated,
                     "n_mentions": len(mentioned), "n_hallucinated": len(hallucinated), "covered": len(covered),
                     "n_truth": len(item.truth), "cog_hits": len(hit), "n_hallu": len(item.hallu)})
    return pd.DataFrame(rows, columns=["id", "response", "mentions", "hallucinated", "n_mentions", "n_hallucinated",
                                       "covered", "n_truth", "cog_hits", "n_hallu"])


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    return float(num.sum() / den.sum()) if den.sum() else float("nan")


GENERATIVE_METRICS = {
    "chair": lambda t: _ratio(t[:, 1], t[:, 0]),
    "cover": lambda t: _ratio(t[:, 2], t[:, 3]),
    "hal": lambda t: float((t[:, 1] > 0).mean()) if len(t) else float("nan"),
    "cog": lambda t: _ratio(t[:, 4], t[:, 5]),
}


def amber_generative_metrics(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """CHAIR, Cover, Hal and Cog (as fractions, AMBER prints percentages), with bootstrap intervals over responses."""
    table = scores[["n_mentions", "n_hallucinated", "covered", "n_truth", "cog_hits", "n_hallu"]].to_numpy(float)
    out: dict[str, float] = {"n": len(scores)}
    for name, fn in GENERATIVE_METRICS.items():
        out[name] = fn(table) if len(table) else float("nan")
        out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap_ci(table, fn, n_boot=n_boot, seed=seed)
    return out


__all__ = ["AmberItem", "AmberFormatError", "AmberVocabulary", "DIMENSIONS", "read_amber", "read_amber_folder",
           "amber_binary", "amber_binary_with_ci", "amber_generative_scores", "amber_generative_metrics", "json_array"]
