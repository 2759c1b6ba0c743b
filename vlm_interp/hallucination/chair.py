"""CHAIR: object hallucination in captions, from a vocabulary of canonical objects and their synonyms.

CHAIR_i = hallucinated object mentions / all object mentions; CHAIR_s = captions with at
least one hallucinated object / all captions; recall = ground-truth objects mentioned /
ground-truth objects. A vocabulary file maps each canonical object to the words (one or
several tokens) that name it; plurals are recognised by simple English rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import jsonl_rows
from .stats import bootstrap_ci

VOCAB_DIR = Path(__file__).parent / "vocab"


def _plurals(word: str) -> set[str]:
    """The word and its regular plural forms ("box" -> "boxes", "lady" -> "ladies", "knife" -> "knives")."""
    last = word.split(" ")[-1]
    stem = word[: len(word) - len(last)]
    forms = {last, last + "s"}
    if last.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(last + "es")
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        forms.add(last[:-1] + "ies")
    if last.endswith("fe"):
        forms.add(last[:-2] + "ves")
    if last.endswith("f"):
        forms.add(last[:-1] + "ves")
    if last.endswith("man"):
        forms.add(last[:-3] + "men")
    return {stem + f for f in forms}


@dataclass
class Vocabulary:
    """Canonical objects and the surface forms that mention them."""

    synonyms: dict[str, list[str]]

    @classmethod
    def load(cls, name_or_path: str) -> "Vocabulary":
        """A built-in vocabulary (``shapes``, ``coco``) or a JSON file {canonical: [words, ...]}."""
        path = VOCAB_DIR / f"{name_or_path}.json"
        path = path if path.exists() else Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no CHAIR vocabulary {name_or_path!r}: built-in ones are "
                                    f"{sorted(p.stem for p in VOCAB_DIR.glob('*.json'))}, or give a JSON file path")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: a CHAIR vocabulary maps each canonical object to a list of words")
        return cls(data)

    def __post_init__(self) -> None:
        forms: dict[str, str] = {}
        for canonical, words in self.synonyms.items():
            for word in [canonical, *words]:
                for form in _plurals(word.lower()):
                    forms.setdefault(form, canonical)
        # longest forms first, so "teddy bear" wins over "bear" and "hot dog" over "dog"
        ordered = sorted(forms, key=lambda f: (-len(f.split()), -len(f)))
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(f) for f in ordered) + r")\b")
        self._forms = forms

    def mentions(self, caption: str) -> list[str]:
        """Canonical objects mentioned in ``caption``, in order, once per mention."""
        return [self._forms[m.group(1)] for m in self._pattern.finditer(caption.lower())]


def chair_scores(captions: list[str], truths: list[set[str]], vocab: Vocabulary) -> pd.DataFrame:
    """Per-caption mentions, hallucinations and recall."""
    rows = []
    for caption, truth in zip(captions, truths, strict=True):
        mentioned = vocab.mentions(caption)
        hallucinated = [m for m in mentioned if m not in truth]
        rows.append({"caption": caption, "mentions": mentioned, "hallucinated": hallucinated,
                     "n_mentions": len(mentioned), "n_hallucinated": len(hallucinated),
                     "recalled": len(truth & set(mentioned)), "n_truth": len(truth),
                     "length": len(caption.split())})
    return pd.DataFrame(rows)


def chair_metrics(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, recall and average length, with bootstrap intervals over captions."""
    def chair_i(rows):
        return rows[:, 1].sum() / rows[:, 0].sum() if rows[:, 0].sum() else float("nan")

    def chair_s(rows):
        return float((rows[:, 1] > 0).mean())

    def recall(rows):
        return rows[:, 2].sum() / rows[:, 3].sum() if rows[:, 3].sum() else float("nan")

    table = scores[["n_mentions", "n_hallucinated", "recalled", "n_truth"]].to_numpy(dtype=float)
    out: dict[str, float] = {"n": len(scores)}
    if not len(scores):
        return {**out, "chair_i": float("nan"), "chair_s": float("nan"), "recall": float("nan"),
                "avg_length": float("nan")}
    for name, fn in (("chair_i", chair_i), ("chair_s", chair_s), ("recall", recall)):
        out[name] = float(fn(table))
        out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap_ci(table, fn, n_boot=n_boot, seed=seed)
    out["avg_length"] = float(np.mean(scores["length"]))
    return out


def read_caption_truth(path: "str | Path") -> list[dict]:
    """Ground truth for CHAIR: JSON lines with ``image`` and ``objects`` (canonical names), as the zoo writes."""
    rows = []
    for number, row in jsonl_rows(path):
        try:
            rows.append({"image": str(row["image"]), "objects": [str(o) for o in row["objects"]]})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected 'image' and a list 'objects' ({err!r})") from None
    return rows


def run_chair(vlm, truth_file: "str | Path", images: "str | Path", vocab: "str | Vocabulary" = "shapes",
              prompt: str = "Describe the image.", max_new_tokens: int = 32, limit: int | None = None,
              progress: bool = True, batch_size: int = 1) -> tuple[pd.DataFrame, dict[str, float]]:
    """Caption every image with ``vlm`` (greedy) and score the captions with CHAIR.

    ``batch_size`` images are captioned per ``generate`` (:mod:`vlm_interp.batching`); the captions
    are those of one at a time.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .. import batching

    batching.check_batch_size(batch_size)
    vocab = Vocabulary.load(vocab) if isinstance(vocab, str) else vocab
    truth = read_caption_truth(truth_file)[:limit]
    captions: list[str] = []
    with tqdm(total=len(truth), desc=f"CHAIR {vlm.name}", disable=not progress) as bar:
        for lo in range(0, len(truth), batch_size):
            examples = []
            for row in truth[lo:lo + batch_size]:
                path = Path(images) / row["image"]
                if not path.exists():
                    raise FileNotFoundError(f"{truth_file}: image {row['image']!r} not found in {images}")
                examples.append(vlm.prepare(Image.open(path).convert("RGB"), prompt))
            if batch_size == 1:
                captions.append(vlm.generate(examples[0], max_new_tokens=max_new_tokens))
            else:
                texts: list[str] = [""] * len(examples)
                for index in batching.plan(vlm, examples, batch_size):
                    batch = batching.collate(vlm, [examples[i] for i in index])
                    for i, text in zip(index, batching.generate(vlm, batch, max_new_tokens=max_new_tokens)):
                        texts[i] = text
                captions += texts
            bar.update(len(examples))
    scores = chair_scores(captions, [set(r["objects"]) for r in truth], vocab)
    scores.insert(0, "image", [r["image"] for r in truth])
    return scores, chair_metrics(scores)
