"""POPE: read question sets, answer them with a VLM, keep every answer, report metrics.

Each question is answered twice: by greedy generation parsed with POPE's rule, and from the
first-token logits (P(yes) against P(no)), so that parsing failures can be seen. Every
answer goes to a per-question JSON-lines file, one flushed line per question; an
interrupted run resumes from it. Several processes share the questions by rank.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import batching
from ..parallel import process_rank, share, wait
from ..errors import VLMInterpError
from ..example import Example
from ..files import atomic_write, changed_settings, jsonl_rows, jsonl_text
from ..model import VLM
from .answers import is_explicit, parse_yes_no
from .stats import binary_metrics_with_ci

SPLITS = ("random", "popular", "adversarial")
DEFAULT_SUFFIX = ""  # peers differ: " Please answer this question with one word." or " Please answer yes or no."


class PopeFormatError(VLMInterpError, ValueError):
    """A POPE file or its images are malformed or missing."""


@dataclass(frozen=True)
class PopeItem:
    """One POPE question (the standard layout: question_id, image, text, label) and its split."""

    question_id: int
    image: str
    text: str
    label: str
    split: str


def read_pope(path: "str | Path", split: str | None = None, images: "str | Path | None" = None) -> list[PopeItem]:
    """Read a POPE JSON-lines file; ``split`` defaults to the file name (``adversarial.jsonl``).

    Errors name the file and line. With ``images`` every referenced image must exist.
    """
    path = Path(path)
    split = split or path.stem.split("_")[-1]
    if split not in SPLITS:
        raise PopeFormatError(f"{path}: unknown split {split!r}; splits are {SPLITS} (pass split= to choose)")
    items = []
    for number, row in jsonl_rows(path, PopeFormatError):
        try:
            item = PopeItem(int(row["question_id"]), str(row["image"]), str(row["text"]), str(row["label"]), split)
        except (KeyError, TypeError, ValueError) as err:
            raise PopeFormatError(f"{path}:{number}: not a POPE line ({type(err).__name__}: {err}); "
                                  "expected question_id, image, text, label") from None
        if item.label not in ("yes", "no"):
            raise PopeFormatError(f"{path}:{number}: label {item.label!r} must be 'yes' or 'no'")
        if images is not None and not (Path(images) / item.image).exists():
            raise PopeFormatError(f"{path}:{number}: image {item.image!r} not found in {images}")
        items.append(item)
    ids = [i.question_id for i in items]
    if len(set(ids)) != len(ids):
        raise PopeFormatError(f"{path}: question_id values repeat; they must identify questions uniquely")
    return items


def _done(results: Path) -> dict[tuple[str, int], dict]:
    """Answers already in a results file; a torn last line (interrupted write) is dropped with a warning."""
    done: dict[tuple[str, int], dict] = {}
    if not results.exists():
        return done
    lines = results.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{results}:{number}: dropping an interrupted last line; that question is redone")
                with open(results, "r+", encoding="utf-8") as f:
                    f.truncate(sum(len(x.encode()) for x in lines[:-1]))
                break
            raise PopeFormatError(f"{results}:{number}: corrupt results line") from None
        done[(row["split"], row["question_id"])] = row
    return done


def _yes_no(vlm: VLM, ex: Example, logits: torch.Tensor) -> dict:
    """P(yes), P(no) and the answer whose logit is higher, from the first answer token's logits (float32)."""
    yes, no = vlm.encode_answer(ex, "yes")[0], vlm.encode_answer(ex, "no")[0]
    p = torch.softmax(logits.float(), -1)
    return {"p_yes": float(p[yes]), "p_no": float(p[no]), "logit_answer": "yes" if logits[yes] > logits[no] else "no"}


@torch.no_grad()
def logit_answer(vlm: VLM, ex: Example) -> dict:
    """The first-token reading of a yes/no question: P(yes), P(no) and the answer whose logit is higher."""
    return _yes_no(vlm, ex, vlm.first_token_logits(ex))


def _row(item: PopeItem, suffix: str, text: str, reading: dict) -> dict:
    return {**asdict(item), "suffix": suffix, "answer_text": text, "parsed": parse_yes_no(text),
            "explicit": is_explicit(text), **reading}


@torch.no_grad()
def answer(vlm: VLM, item: PopeItem, image: Image.Image, suffix: str, max_new_tokens: int) -> dict:
    """Answer one question by generation and by first-token logits."""
    ex = vlm.prepare(image, item.text + suffix)
    return _row(item, suffix, vlm.generate(ex, max_new_tokens=max_new_tokens), logit_answer(vlm, ex))


@torch.no_grad()
def answer_many(vlm: VLM, items: Sequence[PopeItem], images: Sequence[Image.Image], suffix: str,
                max_new_tokens: int, batch_size: int) -> list[dict]:
    """Answer several questions in batches of up to ``batch_size`` (:mod:`vlm_interp.batching`); the rows equal
    :func:`answer`'s, in the order of ``items``."""
    examples = [vlm.prepare(image, item.text + suffix) for item, image in zip(items, images, strict=True)]
    rows: list[dict | None] = [None] * len(examples)
    for index in batching.plan(vlm, examples, batch_size):
        batch = batching.collate(vlm, [examples[i] for i in index])
        texts = batching.generate(vlm, batch, max_new_tokens=max_new_tokens)
        logits = batching.first_token_logits(vlm, batch)
        for k, i in enumerate(index):
            rows[i] = _row(items[i], suffix, texts[k], _yes_no(vlm, examples[i], logits[k]))
    return rows


def _check_resumable(done: dict[tuple[str, int], dict], items: Sequence[PopeItem], results: Path,
                     settings: dict) -> None:
    """Kept answers must have been made with ``settings`` and to the same questions; anything else is an error."""
    for row in done.values():
        changed = changed_settings(row, settings)
        if changed:
            raise PopeFormatError(f"{results} holds answers made with other settings: {changed}; "
                                  "use another results file (--out)")
    for item in items:
        row = done.get((item.split, item.question_id))
        if row is not None and (row["image"], row["text"]) != (item.image, item.text):
            raise PopeFormatError(f"{results} holds an answer to {item.split} question {item.question_id} that asked "
                                  f"{row['text']!r} about {row['image']}, but it now asks {item.text!r} about "
                                  f"{item.image}: the questions changed; use another results file (--out)")


def run_pope(vlm: VLM, items: Sequence[PopeItem], images: "str | Path", results: "str | Path",
             suffix: str = DEFAULT_SUFFIX, max_new_tokens: int = 8, rank: int = 0, world_size: int = 1,
             progress: bool = True, also_done: Iterable["str | Path"] = (), intervention: str = "none",
             batch_size: int = 1) -> Path:
    """Answer ``items`` (this rank's share) and append each answer to ``results`` as one JSON line.

    Every answer records the model, its weights' dtype, prompt suffix, ``max_new_tokens`` and
    ``intervention`` (a label of the intervention the caller attached). Questions already in ``results`` (or in the
    ``also_done`` files of other ranks) are skipped (resume); an existing answer made with other
    settings, or to another question under the same id, is an error rather than a silent mix.
    ``batch_size`` questions are answered per forward and per ``generate`` (the answers are those
    of one at a time, so it is not a setting a resumed run must keep).
    """
    batching.check_batch_size(batch_size)
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = _done(results)
    for other in also_done:
        if Path(other) != results:
            done.update(_done(Path(other)))
    settings = {"model": vlm.name, "dtype": str(vlm.dtype).removeprefix("torch."), "suffix": suffix,
                "max_new_tokens": max_new_tokens, "intervention": intervention}
    _check_resumable(done, items, results, settings)
    mine = [it for it in share(items, rank, world_size) if (it.split, it.question_id) not in done]
    window = 1 if batch_size == 1 else BATCH_WINDOW * batch_size  # batches are formed within a window of questions
    with open(results, "a", encoding="utf-8") as out, \
            tqdm(total=len(mine), desc=f"POPE {vlm.name} (rank {rank})", disable=not progress) as bar:
        for lo in range(0, len(mine), window):
            chunk = mine[lo:lo + window]
            images_ = [_image(images, item) for item in chunk]
            rows = [answer(vlm, chunk[0], images_[0], suffix, max_new_tokens)] if batch_size == 1 else \
                answer_many(vlm, chunk, images_, suffix, max_new_tokens, batch_size)
            for row in rows:
                out.write(json.dumps({**row, **settings}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(chunk))
    return results


BATCH_WINDOW = 4  # batched runs prepare this many batches of questions at once and group them by shape


def _image(images: "str | Path", item: PopeItem) -> Image.Image:
    path = Path(images) / item.image
    if not path.exists():
        raise PopeFormatError(f"image {item.image!r} of question {item.question_id} not found in {images}")
    return Image.open(path).convert("RGB")


def merge_results(parts: Iterable["str | Path"], out: "str | Path") -> pd.DataFrame:
    """Gather per-rank result files into one, checking nothing is lost or duplicated; written atomically."""
    rows = [row for part in parts for row in _done(Path(part)).values()]
    frame = pd.DataFrame(rows).sort_values(["split", "question_id"]).reset_index(drop=True)
    dup = frame.duplicated(["split", "question_id"])
    if dup.any():
        raise PopeFormatError(f"{int(dup.sum())} questions were answered by more than one process")
    atomic_write(out, jsonl_text(frame.to_dict("records")))
    return frame


def load_results(path: "str | Path") -> pd.DataFrame:
    return pd.DataFrame(list(_done(Path(path)).values()))


def pope_table(frame: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Metrics per split and answer source (parsed generation, logits) with bootstrap intervals."""
    rows = []
    for split, group in frame.groupby("split", sort=False):
        for source, column in (("generation", "parsed"), ("logits", "logit_answer")):
            m = binary_metrics_with_ci(group[column].tolist(), group["label"].tolist(), n_boot=n_boot)
            rows.append({"split": split, "source": source, **m,
                         "not_explicit": int((~group["explicit"]).sum()) if source == "generation" else 0})
    order = {s: i for i, s in enumerate(SPLITS)}
    return pd.DataFrame(rows).sort_values(["split", "source"], key=lambda c: c.map(order) if c.name == "split" else c)


def unanswered(items: Sequence[PopeItem], folder: "str | Path", rank: int = 0, world_size: int = 1) -> int:
    """How many of this rank's share of ``items`` have no answer yet in the per-rank files of ``folder``."""
    done: dict = {}
    for part in sorted((Path(folder) / "parts").glob("rank*.jsonl")):
        done.update(_done(part))
    return sum((item.split, item.question_id) not in done for item in share(items, rank, world_size))


def run_pope_sharded(vlm: VLM, items: Sequence[PopeItem], images: "str | Path", folder: "str | Path",
                     suffix: str = DEFAULT_SUFFIX, max_new_tokens: int = 8, progress: bool = True,
                     intervention: str = "none", batch_size: int = 1) -> pd.DataFrame:
    """Answer all ``items`` across the processes of an ``accelerate launch`` (or alone), then merge.

    Each rank appends to ``folder/parts/rank<r>.jsonl``; the results of all parts are merged,
    without loss or duplication, into ``folder/results.jsonl`` by the main process. The answers
    returned are those to ``items`` only, even where the folder keeps answers to other questions
    (other splits, a larger set) from earlier runs.
    """
    folder = Path(folder)
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    rank, world, state = process_rank()
    existing = sorted(parts.glob("rank*.jsonl"))
    run_pope(vlm, items, images, parts / f"rank{rank}.jsonl", suffix, max_new_tokens, rank, world, progress,
             also_done=existing, intervention=intervention, batch_size=batch_size)
    wait(state)
    merged = folder / "results.jsonl"
    wanted = {(i.split, i.question_id) for i in items}
    if rank == 0:
        frame = merge_results(sorted(parts.glob("rank*.jsonl")), merged)
        have = set(zip(frame["split"], frame["question_id"]))
        if not wanted <= have:
            raise PopeFormatError(f"{len(wanted - have)} questions have no answer after the run; rerun to resume")
    wait(state)
    frame = load_results(merged)
    asked = [key in wanted for key in zip(frame["split"], frame["question_id"])]
    return frame[asked].reset_index(drop=True)
