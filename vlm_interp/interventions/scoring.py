"""Head scores (V-SEAM): ablate one attention head at a time and measure the answer probability.

Every batch row ablates a different head of the same example (the tracing engine's trick), so
one forward scores a whole layer x head grid. A head's score on one example is
``p(answer) - p(answer | head ablated)``: positive when the head helps the correct answer,
negative when removing it would help. Per-example rows are kept, so the same scores give
V-SEAM's *positive* heads (mean over examples the model answers right) and *negative* heads
(mean over examples it answers wrong), and the signed mean over all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..edits import applied
from ..example import Example
from ..files import atomic_write, changed_settings
from ..hooks import Hook
from ..parallel import process_rank, share, unique_keys, wait
from ..sites import HEAD_COMPONENTS, Site
from ..figures import pyplot, save_figure
from ..tracing.engine import repeat_inputs
from ..tracing.results import Labelled
from .steps import InterventionError

Ablation = Literal["mean", "zero", "dataset_mean"]
ABLATIONS = ("mean", "zero", "dataset_mean")


@dataclass
class HeadScores(Labelled):
    """Per-example head effects, dims (example, layer, head), with ``correct`` per example."""

    def signed(self) -> xr.DataArray:
        """Mean effect over all examples: V-SEAM's signed head score."""
        return self.data.mean("example")

    def positive(self) -> xr.DataArray:
        """Mean effect over examples the model answers right (ablation hurts a correct answer when > 0)."""
        return self._subset(True).mean("example")

    def negative(self) -> xr.DataArray:
        """Mean effect over examples the model answers wrong (ablation helps when < 0)."""
        return self._subset(False).mean("example")

    def _subset(self, correct: bool) -> xr.DataArray:
        keep = np.asarray(self.data.coords["correct"].values, dtype=bool) == correct
        if not keep.any():
            raise InterventionError(f"no example was answered {'right' if correct else 'wrong'}; "
                                    "that kind of head score is undefined on this set")
        return self.data.isel(example=np.flatnonzero(keep))

    def top(self, k: int = 5, kind: str = "signed") -> pd.DataFrame:
        """The ``k`` heads with the largest absolute score of one kind (signed, positive, negative)."""
        grid = getattr(self, kind)()
        frame = grid.to_dataframe(name="score").reset_index()[["layer", "head", "score"]]
        tower, component = self.attrs["tower"], self.attrs["component"]
        frame["site"] = [Site(tower, component, int(l), int(h)).name for l, h in zip(frame["layer"], frame["head"])]
        return frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)


def _rows_hooks(vlm, tower: str, component: str, heads: list[Site], ablation: Ablation,
                means: dict[Site, torch.Tensor] | None) -> list[Hook]:
    """One hook per layer; batch row r replaces head ``heads[r]`` by its ablation value."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row, site in enumerate(heads):
        by_layer.setdefault(site.layer, []).append((row, site.head))
    hooks = []
    for layer, rows in by_layer.items():
        d = vlm.adapter.head_dim(Site(tower, component, layer, 0))
        n = vlm.adapter.n_heads[tower]
        path, kind = vlm.adapter.hook_point(tower, component, layer)

        def ablate(t: torch.Tensor, rows=rows, d=d, n=n, layer=layer) -> torch.Tensor:
            out = t.clone()
            split = t.view(*t.shape[:-1], n, d)
            for row, head in rows:
                sl = slice(head * d, (head + 1) * d)
                if ablation == "zero":
                    out[row, ..., sl] = 0
                elif ablation == "mean":
                    others = [h for h in range(n) if h != head]
                    out[row, ..., sl] = split[row, ..., others, :].mean(-2)
                else:
                    out[row, ..., sl] = means[Site(tower, component, layer, head)].to(t.dtype)
            return out

        hooks.append(Hook(path, fn=ablate, kind=kind, name=f"ablate heads at {tower}.{component}.{layer}"))
    return hooks


def head_means(vlm, examples: Iterable[Example], tower: str = "lm", component: str = "head") -> dict[Site, torch.Tensor]:
    """Each head's output averaged over all positions of all examples (the dataset-mean ablation value)."""
    sites = vlm.adapter.sites(tower, component)
    layers = sorted({s.layer for s in sites})
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for ex in examples:
        hooks = {}
        for layer in layers:
            path, kind = vlm.adapter.hook_point(tower, component, layer)
            hooks[layer] = Hook(path, kind=kind, capture=True)
        with torch.no_grad(), applied(vlm, ex), vlm.attach(hooks.values()):
            vlm.logits(ex.inputs)
        for layer, hook in hooks.items():
            flat = hook.value.reshape(-1, hook.value.shape[-1])
            sums[layer] = sums.get(layer, 0) + flat.sum(0)
        count += flat.shape[0]
    if not count:
        raise InterventionError("head_means needs at least one example")
    out = {}
    for s in sites:
        d = vlm.adapter.head_dim(s)
        out[s] = (sums[s.layer] / count)[s.head * d:(s.head + 1) * d]
    return out


def _answer_prob(vlm, logits: torch.Tensor, ex: Example) -> torch.Tensor:
    return torch.softmax(logits[:, vlm.answer_start(ex)].float(), -1)[:, ex.answer_ids[0]]


def score_example(vlm, ex: Example, tower: str = "lm", component: str = "head", ablation: Ablation = "mean",
                  means: dict[Site, torch.Tensor] | None = None, batch_size: int = 64) -> dict:
    """Head effects on one example: ``{"p": p(answer), "correct": bool, "effect": [[layer][head]]}``."""
    if ex.answer_ids is None:
        raise InterventionError("head scoring needs examples with an answer: prepare(..., answer=...)")
    heads = vlm.adapter.sites(tower, component)
    layers = sorted({s.layer for s in heads})
    with torch.no_grad(), applied(vlm, ex):
        logits = vlm.logits(ex.inputs)
        p = float(_answer_prob(vlm, logits, ex)[0])
        correct = int(logits[0, vlm.answer_start(ex)].argmax()) == ex.answer_ids[0]
        ablated = []
        for start in range(0, len(heads), batch_size):
            chunk = heads[start:start + batch_size]
            with vlm.attach(_rows_hooks(vlm, tower, component, chunk, ablation, means)):
                ablated.append(_answer_prob(vlm, vlm.logits(repeat_inputs(ex.inputs, len(chunk))), ex))
    effect = np.full((len(layers), vlm.adapter.n_heads[tower]), np.nan)
    for site, value in zip(heads, torch.cat(ablated).tolist()):
        effect[layers.index(site.layer), site.head] = p - value
    return {"p": p, "correct": bool(correct), "effect": effect.tolist(), "layers": layers}


def score_heads(vlm, examples: Sequence[tuple[str, Example]] | Sequence[Example], tower: str = "lm",
                component: str = "head", ablation: Ablation = "mean", folder: "str | Path | None" = None,
                batch_size: int = 64, progress: bool = True, level: str = "") -> HeadScores:
    """Score every head of ``tower`` by ablation on each example; resumable through ``folder``.

    ``examples`` are Examples with answers, or ``(key, example)`` pairs; with ``folder`` each
    example's scores go to ``folder/<key>.json`` and a rerun skips finished keys. Each record names
    the model, tower, component and ablation it was made with; a rerun with others is an error.
    Under ``accelerate launch`` (it needs ``folder``) each process scores its share of the examples
    (:mod:`vlm_interp.parallel`), then every process reads all records back and returns all scores.
    """
    if ablation not in ABLATIONS:
        raise InterventionError(f"unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    if component not in HEAD_COMPONENTS:
        raise InterventionError(f"component {component!r} has no heads; use one of {sorted(HEAD_COMPONENTS)}")
    items = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(examples)]
    if not items:
        raise InterventionError("score_heads needs at least one example")
    unique_keys([key for key, _ in items], "score_heads")
    rank, world, state = process_rank()
    if world > 1 and folder is None:
        raise InterventionError("score_heads over several processes keeps each example's scores in a file: pass folder=")
    means = head_means(vlm, [e for _, e in items], tower, component) if ablation == "dataset_mean" else None
    folder = Path(folder) if folder is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    settings = {"model": vlm.name, "tower": tower, "component": component, "ablation": ablation}
    rows: dict[str, dict] = {}
    mine = [(key, ex) for key, ex in share(items, rank, world) if folder is None or not (folder / f"{key}.json").exists()]
    for key, ex in tqdm(mine, desc=f"scoring {tower} heads", disable=not progress):
        rows[key] = {"key": key, **settings, **score_example(vlm, ex, tower, component, ablation, means, batch_size)}
        if folder is not None:
            atomic_write(folder / f"{key}.json", json.dumps(rows[key]))
    wait(state)
    missing = [key for key, _ in items if key not in rows and not (folder / f"{key}.json").exists()]
    if missing:
        raise InterventionError(f"{len(missing)} examples have no scores in {folder} after the run ({missing[:5]}); "
                                "rerun to resume")
    rows = [rows[key] if key in rows else json.loads((folder / f"{key}.json").read_text()) for key, _ in items]
    stale = [r for r in rows if changed_settings(r, settings)]
    if stale:
        raise InterventionError(f"{folder} holds scores made with other settings "
                                f"({changed_settings(stale[0], settings)}) for {[r['key'] for r in stale[:5]]}; "
                                "use a new folder (--out)")
    data = xr.DataArray(np.array([r["effect"] for r in rows]), dims=("example", "layer", "head"),
                        coords={"example": [r["key"] for r in rows], "layer": rows[0]["layers"],
                                "head": list(range(vlm.adapter.n_heads[tower])),
                                "correct": ("example", [r["correct"] for r in rows]),
                                "p": ("example", [r["p"] for r in rows])},
                        attrs={"model": vlm.name, "tower": tower, "component": component, "ablation": ablation,
                               "level": level, "metric": "p(answer) - p(answer | head ablated)"})
    return HeadScores(data)


def compare_levels(scores: dict[str, HeadScores], kind: str = "signed", k: int = 5) -> pd.DataFrame:
    """How similar head scores are across semantic levels: Spearman correlation and top-k overlap."""
    names = list(scores)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ga, gb = getattr(scores[a], kind)(), getattr(scores[b], kind)()
            va, vb = pd.Series(ga.values.ravel()), pd.Series(gb.values.ravel())
            ta = set(scores[a].top(k, kind).site)
            tb = set(scores[b].top(k, kind).site)
            rows.append({"a": a, "b": b, "spearman": float(va.corr(vb, method="spearman")),
                         f"top{k}_overlap": len(ta & tb) / k})
    return pd.DataFrame(rows)


def plot_head_scores(scores: dict[str, HeadScores], path: "str | Path", kind: str = "signed") -> Path:
    """Side-by-side layer x head heatmaps of one kind of score, one panel per level or model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        grid = getattr(s, kind)()
        top = float(np.nanmax(np.abs(grid.values))) or 1.0
        im = ax.imshow(grid.values, aspect="auto", cmap="RdBu_r", origin="lower", vmin=-top, vmax=top)
        ax.set(xlabel="head", ylabel="layer", title=f"{name} ({kind})")
        fig.colorbar(im, ax=ax, fraction=0.05)
    return save_figure(fig, Path(path))
