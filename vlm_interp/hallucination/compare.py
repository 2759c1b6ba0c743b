"""Side-by-side hallucination numbers for several models (and interventions) on the same questions."""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import pandas as pd

from ..files import atomic_write
from ..loading import load
from ..model import VLM
from ..figures import pyplot, save_figure
from .stats import mcnemar
from .pope import SPLITS, PopeItem, pope_table, process_rank, read_pope, run_pope_sharded, unanswered
from .sets import question_folder

Intervention = Callable[[VLM], ContextManager]


@dataclass
class Comparison:
    """The table (one row per system, split and answer source), paired tests, and written files."""

    table: pd.DataFrame
    tests: pd.DataFrame
    files: dict[str, Path]

    def to_html(self, path: "str | Path | None" = None, title: str = "Comparison") -> "str | Path":
        """An interactive, self-contained HTML report: the table with intervals, grouped plot, paired tests."""
        from ..report import comparison_page

        return comparison_page(self.table.to_dict("records"), self.tests.to_dict("records"), path, title)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def read_pope_folder(folder: "str | Path", splits: Sequence[str] = SPLITS) -> list[PopeItem]:
    """All questions of the named splits in a folder holding ``<split>.jsonl`` and ``images/``."""
    folder = Path(folder)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown POPE split(s) {unknown}; splits are {SPLITS}")
    return [item for s in splits for item in read_pope(folder / f"{s}.jsonl", s, images=folder / "images")]


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-style Markdown table (no extra dependency); a '|' inside a cell is escaped."""
    def cell(v):
        return (format(v, floatfmt) if isinstance(v, float) else str(v)).replace("|", "\\|")

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def plot_comparison(table: pd.DataFrame, path: Path, metric: str = "accuracy", source: str = "logits") -> Path:
    """Grouped bars: one group per split, one bar per system, with bootstrap intervals."""
    import numpy as np

    plt = pyplot()
    data = table[table["source"] == source]
    systems = list(dict.fromkeys(data["system"]))
    splits = [s for s in SPLITS if s in set(data["split"])]
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(splits), 3.2))
    for k, system in enumerate(systems):
        rows = data[data["system"] == system].set_index("split").reindex(splits)
        x = np.arange(len(splits)) + (k - (len(systems) - 1) / 2) * width
        err = np.abs(np.vstack([rows[metric] - rows[f"{metric}_lo"], rows[f"{metric}_hi"] - rows[metric]]))
        ax.bar(x, rows[metric], width, yerr=err, capsize=3, label=system)
    ax.set_xticks(np.arange(len(splits)), splits)
    ax.set_ylabel(f"POPE {metric} ({source})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def paired_tests(results: dict[str, pd.DataFrame], source_column: str) -> pd.DataFrame:
    """McNemar tests between every pair of systems, per split, on the questions both answered."""
    rows = []
    for (a, fa), (b, fb) in itertools.combinations(results.items(), 2):
        joined = fa.merge(fb, on=["split", "question_id"], suffixes=("_a", "_b"))
        for split, group in joined.groupby("split"):
            test = mcnemar(group[f"{source_column}_a"] == group["label_a"], group[f"{source_column}_b"] == group["label_b"])
            rows.append({"a": a, "b": b, "split": split, "n": len(group), **test})
    return pd.DataFrame(rows)


def compare(models: Sequence["str | VLM"], benchmark: str = "pope", questions: "str | Path | None" = None,
            out: "str | Path" = "vlm-interp-compare", interventions: dict[str, Intervention] | None = None,
            splits: Sequence[str] = SPLITS, suffix: str = "", max_new_tokens: int = 8, n_boot: int = 1000,
            progress: bool = True, n_images: int | None = None, batch_size: int = 1,
            load_options: dict | None = None) -> Comparison:
    """Evaluate each model (with each intervention, plus the unmodified model) on the same questions.

    ``questions`` is a folder with ``<split>.jsonl`` and ``images/``, or the name of a built-in set
    (:func:`~vlm_interp.hallucination.sets.question_folder`; ``None`` is ``"zoo"``, the shapes-world
    set, over ``n_images`` images: default 400, only for a built-in set). Writes
    ``table.csv``, ``table.md``, ``tests.csv`` and ``compare.png`` to ``out``; per-question answers
    stay in ``out/<system>/results.jsonl`` and interrupted runs resume from them. ``batch_size``
    questions are answered at once (:func:`~vlm_interp.hallucination.pope.run_pope`); models given
    by name load with ``load_options`` (``dtype``, ``device_map``..., see :func:`~vlm_interp.load`). Each answer
    records its intervention's ``spec`` (as :func:`~vlm_interp.interventions.from_spec` sets it) or
    else its name, so a resumed system whose intervention changed is an error, not a silent mix.
    """
    if benchmark != "pope":
        raise ValueError(f"unknown benchmark {benchmark!r}; compare supports 'pope' (CHAIR: vlm_interp.hallucination.chair)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = question_folder(questions, out, n_images)
    items = read_pope_folder(folder, splits)
    variants: dict[str, Intervention | None] = {"none": None, **(interventions or {})}
    results: dict[str, pd.DataFrame] = {}
    tables = []
    rank, world, _ = process_rank()
    for model in models:
        vlm = load(model, **(load_options or {})) if isinstance(model, str) else model
        for name, make in variants.items():
            system = vlm.name if name == "none" else f"{vlm.name} + {name}"
            # a finished (resumed) system runs no forward, so its intervention must not be attached
            # (it would rightly complain that it never fired)
            needed = make is not None and unanswered(items, out / slug(system), rank, world) > 0
            with make(vlm) if needed else contextlib.nullcontext():
                frame = run_pope_sharded(vlm, items, folder / "images", out / slug(system), suffix=suffix,
                                         max_new_tokens=max_new_tokens, progress=progress,
                                         intervention=getattr(make, "spec", name), batch_size=batch_size)
            results[system] = frame
            tables.append(pope_table(frame, n_boot=n_boot).assign(system=system, intervention=name))
    table = pd.concat(tables, ignore_index=True)
    table = table[["system", "intervention", *[c for c in table.columns if c not in ("system", "intervention")]]]
    tests = pd.concat([paired_tests(results, "logit_answer").assign(source="logits"),
                       paired_tests(results, "parsed").assign(source="generation")], ignore_index=True) \
        if len(results) > 1 else pd.DataFrame()
    files = {
        "table.csv": atomic_write(out / "table.csv", table.to_csv(index=False)),
        "table.md": atomic_write(out / "table.md", markdown_table(
            table[["system", "split", "source", "accuracy", "accuracy_lo", "accuracy_hi", "precision", "recall",
                   "f1", "yes_ratio", "n"]])),
        "tests.csv": atomic_write(out / "tests.csv", tests.to_csv(index=False)),
        "compare.png": plot_comparison(table, out / "compare.png"),
    }
    return Comparison(table, tests, files)
