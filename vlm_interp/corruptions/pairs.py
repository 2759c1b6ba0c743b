"""Semantic minimal pairs (NOTICE SMP, V-SEAM): two images differing in one semantic thing.

Sources: the shapes world's exact pairs (:func:`from_shapes_pair`), pairs listed in a
JSON-lines file (:func:`read_pairs`, :func:`load_pair`), and any second image for a
prepared example (:func:`with_image`; region edits in ``edit.py`` use it). Every corrupt
Example is checked to have the clean one's token layout (same ids, same groups).

JSON-lines format, one pair per line (paths relative to the file)::

    {"clean_image": "a.png", "corrupt_image": "b.png", "question": "Is there a dog?",
     "clean_answer": "yes", "corrupt_answer": "no", "mask": "a_mask.png"}

``mask`` (a PNG, non-zero = changed) or ``box`` ([x0, y0, x1, y1] in pixels) is optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import geometry
from ..example import Example
from ..files import jsonl_rows
from .base import CorruptionError, check_layout

REQUIRED = ("clean_image", "corrupt_image", "question")
OPTIONAL = ("clean_answer", "corrupt_answer", "mask", "box", "id")


def _region_meta(ex: Example, region: Any) -> None:
    if region is not None:
        ex.meta["mask"] = geometry.region_mask(region, ex.image_hw)


def with_image(vlm, ex: Example, image: Any, region: Any = None, answer: str | None = None) -> Example:
    """``ex`` with another image (same prompt), checked to keep the token layout.

    The prompt text is processed again exactly as it is, so custom templates are kept;
    groups of the clean example (``object`` and any added by hand) are carried over.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise CorruptionError(f"the corrupt image must be a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if ex.image_hw is not None and (image.height, image.width) != tuple(ex.image_hw):
        raise CorruptionError(
            f"the corrupt image is {image.width}x{image.height} but the clean one is {ex.image_hw[1]}x{ex.image_hw[0]} "
            "(width x height); a minimal pair needs images of the same size so both map to the same tokens"
        )
    inputs = dict(vlm.processor(images=image, text=ex.prompt, return_tensors="pt"))
    inputs = {k: v.to(vlm.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    corrupt = ex.derive(inputs=inputs, image=image)
    if answer is not None and answer != ex.answer:
        corrupt.answer, corrupt.answer_ids = answer, vlm.encode_answer(corrupt, answer)
    check_layout(ex, corrupt, "corrupt image", same_ids=True)
    _region_meta(corrupt, region)
    return corrupt


def from_shapes_pair(vlm, pair, question_index: int = 0, region: bool = True) -> tuple[Example, Example]:
    """Clean and corrupt Examples from a :class:`vlm_interp.zoo.scene_pairs.MinimalPair` and one of its questions.

    Each Example gets its own answer (``clean_answer`` / ``corrupt_answer``); with
    ``region=True`` both get the ``object`` group of the changed pixels and ``meta["mask"]``.
    """
    if not 0 <= question_index < len(pair.questions):
        raise CorruptionError(f"question_index {question_index} out of range: the pair has {len(pair.questions)} "
                              f"questions {[q.question for q in pair.questions]}")
    q = pair.questions[question_index]
    mask = pair.mask if region and pair.mask.any() else None
    clean = vlm.prepare(pair.clean.pil(), q.question, answer=q.clean_answer, region=mask)
    corrupt = vlm.prepare(pair.corrupt.pil(), q.question, answer=q.corrupt_answer, region=mask)
    check_layout(clean, corrupt, f"shapes-world {pair.kind} pair", same_ids=True)
    info = {"kind": "pair", "source": "shapes", "level": pair.level, "edit": pair.kind, "change": pair.change,
            "task": q.task}
    for ex in (clean, corrupt):
        if mask is not None:
            ex.meta["mask"] = mask.copy()
        ex.meta["pair"] = info
    corrupt.meta["corruption"] = info
    corrupt.meta["clean_answer"] = q.clean_answer
    return clean, corrupt


@dataclass(frozen=True)
class PairRecord:
    """One line of a pairs file, with paths resolved against the file's folder."""

    clean_image: Path
    corrupt_image: Path
    question: str
    clean_answer: str | None = None
    corrupt_answer: str | None = None
    mask: Path | None = None
    box: tuple[float, float, float, float] | None = None
    id: str | None = None
    source: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def region(self, image_hw: tuple[int, int]) -> np.ndarray | None:
        """The pair's region as a boolean mask of the image (from ``mask`` or ``box``), or None."""
        if self.mask is not None:
            from PIL import Image

            with Image.open(self.mask) as im:
                arr = np.asarray(im.convert("L")) > 0
            if arr.shape != tuple(image_hw):
                raise CorruptionError(f"{self.where}: mask {self.mask} is {arr.shape[1]}x{arr.shape[0]} but the images "
                                      f"are {image_hw[1]}x{image_hw[0]} (width x height)")
            if not arr.any():
                raise CorruptionError(f"{self.where}: mask {self.mask} is empty (all zero)")
            return arr
        if self.box is not None:
            return geometry.region_mask(self.box, image_hw)
        return None


def _record(obj: Any, base: Path, source: str, line: int) -> PairRecord:
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise CorruptionError(f"{where}: expected a JSON object with keys {list(REQUIRED)}, got {type(obj).__name__}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CorruptionError(f"{where}: missing key(s) {missing}; each line needs {list(REQUIRED)}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise CorruptionError(f"{where}: unknown key(s) {unknown}; allowed: {list(REQUIRED + OPTIONAL)}")
    for k in ("clean_image", "corrupt_image", "question", "clean_answer", "corrupt_answer", "mask"):
        if k in obj and obj[k] is not None and not (isinstance(obj[k], str) and obj[k].strip()):
            raise CorruptionError(f"{where}: {k!r} must be a non-empty string, got {obj[k]!r}")
    if obj.get("mask") is not None and obj.get("box") is not None:
        raise CorruptionError(f"{where}: give either 'mask' or 'box', not both")
    box = obj.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 for v in box)):
            raise CorruptionError(f"{where}: 'box' must be [x0, y0, x1, y1] in pixels, got {box!r}")
        if not (box[2] > box[0] and box[3] > box[1]):
            raise CorruptionError(f"{where}: 'box' {box} needs x1 > x0 and y1 > y0")
        box = tuple(float(v) for v in box)
    paths = {}
    for k in ("clean_image", "corrupt_image", "mask"):
        if obj.get(k) is not None:
            path = (base / obj[k]).resolve() if not Path(obj[k]).is_absolute() else Path(obj[k])
            if not path.is_file():
                raise CorruptionError(f"{where}: {k} file {obj[k]!r} not found (looked for {path})")
            paths[k] = path
    return PairRecord(paths["clean_image"], paths["corrupt_image"], obj["question"], obj.get("clean_answer"),
                      obj.get("corrupt_answer"), paths.get("mask"), box,
                      None if obj.get("id") is None else str(obj["id"]), source, line)


def read_pairs(path: str | Path) -> list[PairRecord]:
    """Read and validate a JSON-lines pairs file; errors name the file and line (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CorruptionError(f"pairs file {path} not found")
    records = [_record(obj, path.parent, str(path), number) for number, obj in jsonl_rows(path, CorruptionError)]
    if not records:
        raise CorruptionError(f"pairs file {path} holds no pairs")
    return records


def load_pair(vlm, record: PairRecord, template: str | None = None) -> tuple[Example, Example]:
    """Clean and corrupt Examples of one :class:`PairRecord`, with the region as ``object`` group."""
    from PIL import Image

    images = []
    for path in (record.clean_image, record.corrupt_image):
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as err:
            raise CorruptionError(f"{record.where}: cannot read image {path}: {err}") from None
    clean_img, corrupt_img = images
    if clean_img.size != corrupt_img.size:
        raise CorruptionError(f"{record.where}: clean image is {clean_img.size[0]}x{clean_img.size[1]} but corrupt "
                              f"image is {corrupt_img.size[0]}x{corrupt_img.size[1]}; a pair needs equal sizes")
    region = record.region((clean_img.height, clean_img.width))
    try:
        clean = vlm.prepare(clean_img, record.question, answer=record.clean_answer, template=template, region=region)
        corrupt = vlm.prepare(corrupt_img, record.question, answer=record.corrupt_answer, template=template,
                              region=region)
        check_layout(clean, corrupt, f"pair at {record.where}", same_ids=True)
    except ValueError as err:
        raise CorruptionError(f"{record.where}: {err}") from err
    info = {"kind": "pair", "source": record.where, "id": record.id}
    for ex in (clean, corrupt):
        _region_meta(ex, region)
        ex.meta["pair"] = info
    corrupt.meta["corruption"] = info
    corrupt.meta["clean_answer"] = record.clean_answer
    return clean, corrupt


def pairs_from_file(vlm, path: str | Path, template: str | None = None) -> list[tuple[Example, Example]]:
    """All pairs of a JSON-lines file as (clean, corrupt) Examples."""
    return [load_pair(vlm, r, template) for r in read_pairs(path)]


__all__ = ["PairRecord", "from_shapes_pair", "load_pair", "pairs_from_file", "read_pairs", "with_image"]
