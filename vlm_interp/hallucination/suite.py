"""Several hallucination benchmarks (POPE, CHAIR, AMBER, MME) for several models and interventions, side by side.

Every benchmark is answered through POPE's runner (:func:`~vlm_interp.hallucination.pope.run_pope_sharded`):
one flushed JSON line per question under ``out/<system>/<benchmark part>/``, so an interrupted run resumes
and ``accelerate launch`` shares the questions. Yes/no benchmarks (POPE, AMBER's discriminative part, MME)
are read from generation (each benchmark's own parsing rule) and from first-token logits; caption benchmarks
(CHAIR, AMBER's generative part) from greedy captions. The result is one long table (system, benchmark, part,
source, metric, value, interval), paired tests against every other system per benchmark part (exact
McNemar on per-question correctness; for captions on "the caption hallucinates nothing"), and one figure.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..files import atomic_write
from ..loading import load
from ..figures import pyplot, save_figure
from .amber import amber_binary_with_ci, amber_generative_metrics, amber_generative_scores, read_amber_folder
from .answers import parse_yes_no
from .chair import Vocabulary, chair_metrics, chair_scores, read_caption_truth
from .compare import Comparison, Intervention, markdown_table, read_pope_folder, slug
from .stats import binary_metrics_with_ci, mcnemar
from .mme import SUBTASKS, mme_metrics, parse_mme, read_mme, tool_lines
from .pope import PopeItem, process_rank, run_pope_sharded, unanswered

BENCHMARKS = ("pope", "chair", "amber", "mme")
# where a built-in set of each benchmark is registered (vlm_interp.hallucination.sets); CHAIR uses POPE's
BUILT_IN = {"pope": "zoo", "chair": "zoo", "amber": "zoo-amber", "mme": "zoo-mme"}
CAPTION_PROMPT = "Describe the image."
HEADLINE = {"pope": ("accuracy", "adversarial"), "amber": ("accuracy", "all"), "mme": ("acc", "all"),
            "chair": ("chair_i", "captions"), "amber-generative": ("chair", "generative")}


def built_in_folder(benchmark: str, out: Path, n_images: int | None) -> Path:
    """The registered built-in set of ``benchmark``, written (or reused) in ``out/<name>_set``."""
    from .sets import QUESTION_SETS

    name = BUILT_IN[benchmark]
    if name not in QUESTION_SETS:
        raise ValueError(f"no built-in {benchmark} set is registered ({name!r}); import vlm_interp (the package "
                         f"root registers them) or give a folder of questions for {benchmark}")
    return QUESTION_SETS[name](out / f"{name}_set", n_images)


def _parts(benchmark: str, folder: Path, splits: Sequence[str], prompt: str) -> dict[str, tuple[list, Path, str]]:
    """{part: (items, images folder, kind)}; kind is "yesno" or "caption"; captions carry an empty label."""
    if benchmark == "pope":
        return {"pope": (read_pope_folder(folder, splits), folder / "images", "yesno")}
    if benchmark == "chair":
        truth = read_caption_truth(folder / "captions.jsonl")
        items = [PopeItem(k + 1, r["image"], prompt, "", "captions") for k, r in enumerate(truth)]
        return {"chair": (items, folder / "images", "caption")}
    if benchmark == "mme":
        subtasks = [s for s in SUBTASKS if (folder / s).is_dir() or (folder / f"{s}.txt").is_file()]
        items = [PopeItem(i.question_id, i.image, i.text, i.label, i.subtask) for i in read_mme(folder, subtasks)]
        return {"mme": (items, folder, "yesno")}
    amber, _ = read_amber_folder(folder)
    yesno = [PopeItem(i.id, i.image, i.query, i.truth, i.dimension) for i in amber if not i.generative]
    captions = [PopeItem(i.id, i.image, i.query, "", "generative") for i in amber if i.generative]
    return {"amber": (yesno, folder / "image", "yesno"), "amber-generative": (captions, folder / "image", "caption")}


def _metric_rows(part: str, frame: pd.DataFrame, folder: Path, n_boot: int) -> list[dict]:
    """Long rows (part, split, source, metric, value, lo, hi, n) of one system on one benchmark part."""
    rows = []

    def add(split, source, metrics, names):
        for name in names:
            rows.append({"benchmark": part, "split": split, "source": source, "metric": name,
                         "value": metrics.get(name), "lo": metrics.get(f"{name}_lo"), "hi": metrics.get(f"{name}_hi"),
                         "n": metrics.get("n")})

    if part == "pope":
        for split, g in frame.groupby("split", sort=False):
            for source, col in (("generation", "parsed"), ("logits", "logit_answer")):
                add(split, source, binary_metrics_with_ci(g[col].tolist(), g["label"].tolist(), n_boot=n_boot),
                    ["accuracy", "f1", "yes_ratio"])
    elif part == "amber":
        for split, g in [("all", frame), *frame.groupby("split", sort=False)]:
            for source, col in (("generation", "parsed"), ("logits", "logit_answer")):
                add(split, source, amber_binary_with_ci(g[col].tolist(), g["label"].tolist(), n_boot=n_boot),
                    ["accuracy", "precision", "recall", "f1"])
    elif part == "mme":
        frame = frame.assign(subtask=frame["split"], mme_parsed=[parse_mme(t) for t in frame["answer_text"]])
        for source, col in (("generation", "mme_parsed"), ("logits", "logit_answer")):
            table = mme_metrics(frame, column=col, n_boot=n_boot)
            for r in table.to_dict("records"):
                add("all" if r["subtask"] == "total" else r["subtask"], source, r,
                    ["score"] if r["subtask"] == "total" else ["acc", "acc_plus", "score"])
    else:
        captions = frame.sort_values("question_id")["answer_text"].tolist()
        if part == "chair":
            truth = read_caption_truth(folder / "captions.jsonl")
            scores = chair_scores(captions, [set(r["objects"]) for r in truth], Vocabulary.load("shapes"))
            add("captions", "generation", chair_metrics(scores, n_boot=n_boot), ["chair_i", "chair_s", "recall"])
        else:
            items, vocab = read_amber_folder(folder, ["generative"])
            scores = amber_generative_scores(captions, items, vocab)
            add("generative", "generation", amber_generative_metrics(scores, n_boot=n_boot),
                ["chair", "cover", "hal", "cog"])
    return rows


def _correct(part: str, frame: pd.DataFrame, folder: Path) -> dict[tuple[str, str], pd.Series]:
    """Per-question correctness (indexed by split and id) for the paired tests, by source."""
    frame = frame.set_index(["split", "question_id"]).sort_index()
    if part in ("chair", "amber-generative"):
        captions = frame["answer_text"].tolist()
        if part == "chair":
            truth = read_caption_truth(folder / "captions.jsonl")
            s = chair_scores(captions, [set(r["objects"]) for r in truth], Vocabulary.load("shapes"))
        else:
            items, vocab = read_amber_folder(folder, ["generative"])
            s = amber_generative_scores(captions, items, vocab)
        return {("generation", "all"): pd.Series((s["n_hallucinated"] == 0).to_numpy(), index=frame.index)}
    parse = {"mme": parse_mme, "pope": parse_yes_no, "amber": parse_yes_no}[part]
    out = {}
    for split in ["all", *frame.index.get_level_values(0).unique()]:
        g = frame if split == "all" else frame.loc[[split]]
        out[("generation", split)] = g["answer_text"].map(parse) == g["label"]
        out[("logits", split)] = g["logit_answer"] == g["label"]
    return out


def paired(correct: dict[str, dict]) -> pd.DataFrame:
    """McNemar tests between every pair of systems on every benchmark part, split and source."""
    rows = []
    for (a, ca), (b, cb) in itertools.combinations(correct.items(), 2):
        for key in ca.keys() & cb.keys():
            part, source, split = key
            x, y = ca[key].align(cb[key], join="inner")
            rows.append({"a": a, "b": b, "benchmark": part, "split": split, "source": source, "n": len(x),
                         **mcnemar(x.to_numpy(bool), y.to_numpy(bool))})
    return pd.DataFrame(rows)


def plot_suite(table: pd.DataFrame, path: Path) -> Path:
    """One panel per benchmark part: its headline metric per system (logits where there are), with intervals."""
    plt = pyplot()
    parts = [p for p in HEADLINE if p in set(table["benchmark"])]
    fig, axes = plt.subplots(1, len(parts), figsize=(2.8 * len(parts), 3.2), squeeze=False)
    for ax, part in zip(axes[0], parts):
        metric, split = HEADLINE[part]
        data = table[(table.benchmark == part) & (table.metric == metric) & (table.split == split)]
        source = "logits" if "logits" in set(data["source"]) else "generation"
        data = data[data.source == source]
        lo, hi = (data["value"] - data["lo"]).abs().fillna(0), (data["hi"] - data["value"]).abs().fillna(0)
        ax.bar(range(len(data)), data["value"], yerr=[lo, hi], capsize=3, color=f"C{parts.index(part)}")
        ax.set_xticks(range(len(data)), data["system"], rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{part}: {metric} ({split}, {source})", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def compare_benchmarks(models: Sequence, benchmarks: Sequence[str] = ("pope",), out: "str | Path" = "vlm-interp-compare",
                       interventions: dict[str, Intervention] | None = None, questions: dict[str, "str | Path"] | None = None,
                       n_images: int | None = None, splits: Sequence[str] = ("random", "popular", "adversarial"),
                       suffix: str = "", max_new_tokens: int = 8, caption_tokens: int = 32,
                       prompt: str = CAPTION_PROMPT, n_boot: int = 1000, progress: bool = True) -> Comparison:
    """Every model, unmodified and with each intervention, on every benchmark; resumable (see module docstring).

    ``questions`` maps a benchmark to a folder of its own layout; the others use the built-in shapes-world
    sets over ``n_images`` held-out scenes. Writes ``table.csv`` (long), ``table.md``, ``tests.csv`` and
    ``compare.png`` to ``out``.
    """
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown or not benchmarks:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    questions = dict(questions or {})
    folders = {b: Path(questions[b]) if b in questions else built_in_folder(b, out, n_images) for b in benchmarks}
    parts: dict[str, tuple] = {}
    for b in benchmarks:
        for part, (items, images, kind) in _parts(b, folders[b], splits, prompt).items():
            parts[part] = (items, images, kind, folders[b])
    variants: dict[str, Intervention | None] = {"none": None, **(interventions or {})}
    rank, world, _ = process_rank()
    rows, correct = [], {}
    for model in models:
        vlm = load(model) if isinstance(model, str) else model
        for name, make in variants.items():
            system = vlm.name if name == "none" else f"{vlm.name} + {name}"
            correct[system] = {}
            for part, (items, images, kind, folder) in parts.items():
                where = out / slug(system) / part
                tokens = caption_tokens if kind == "caption" else max_new_tokens
                needed = make is not None and unanswered(items, where, rank, world) > 0
                with make(vlm) if needed else contextlib.nullcontext():
                    frame = run_pope_sharded(vlm, items, images, where, suffix=suffix if kind == "yesno" else "",
                                             max_new_tokens=tokens, progress=progress,
                                             intervention=getattr(make, "spec", name))
                if rank:
                    continue
                if part == "mme":
                    (where / "mme_tool").mkdir(parents=True, exist_ok=True)
                    for subtask in frame["split"].unique():
                        atomic_write(where / "mme_tool" / f"{subtask}.txt",
                                     tool_lines(frame.assign(subtask=frame["split"]), subtask))
                rows += [dict(r, system=system, intervention=name) for r in _metric_rows(part, frame, folder, n_boot)]
                correct[system].update({(part, *k): v for k, v in _correct(part, frame, folder).items()})
    table = pd.DataFrame(rows)
    table = table[["system", "intervention", *[c for c in table.columns if c not in ("system", "intervention")]]]
    tests = paired(correct) if len(correct) > 1 else pd.DataFrame()
    files = {
        "table.csv": atomic_write(out / "table.csv", table.to_csv(index=False)),
        "table.md": atomic_write(out / "table.md", markdown_table(table)),
        "tests.csv": atomic_write(out / "tests.csv", tests.to_csv(index=False)),
        "compare.png": plot_suite(table, out / "compare.png"),
    }
    return Comparison(table, tests, files)


__all__ = ["BENCHMARKS", "compare_benchmarks", "built_in_folder", "paired", "plot_suite"]
