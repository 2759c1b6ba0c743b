"""Dataset-level tracing: many examples, averaged effects with intervals, checkpointed and resumable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..errors import VLMInterpError
from ..example import Example
from ..files import atomic_write
from ..parallel import process_rank, share, unique_keys, wait
from .causal import trace
from .results import Trace


@dataclass
class DatasetTrace:
    """Traces of the examples the model got right, their mean recovery rate, and what was skipped."""

    traces: list[Trace]
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> xr.Dataset:
        """Mean, standard error and 95% interval of the recovery rate over the used examples."""
        if not self.traces:
            raise ValueError(f"no example was traced ({len(self.skipped)} skipped): nothing to average")
        out = Trace.mean(self.traces)
        out.attrs.update({"skipped": len(self.skipped)})
        return out

    def mean_trace(self) -> Trace:
        """The mean recovery rate as a :class:`Trace` (its ``data`` is already a recovery rate), ready to plot."""
        summary = self.summary()
        first = self.traces[0].attrs
        answers = ", ".join(sorted({str(t.attrs["answer"]) for t in self.traces}))
        attrs = {**first, "metric": f"mean RR ({first['metric']})", "answer": answers, "values": "recovery rate",
                 "question": f"mean over {summary.attrs['n']} examples ({len(self.skipped)} skipped)",
                 "clean_score": float(np.mean([t.attrs["clean_score"] for t in self.traces])),
                 "corrupt_score": float(np.mean([t.attrs["corrupt_score"] for t in self.traces]))}
        return Trace(summary["mean"].assign_attrs(attrs).rename("mean recovery rate"))

    def plot(self, path: "str | Path") -> Path:
        """ROME-style heatmaps of the mean recovery rate (one panel per component)."""
        from .plot import plot_trace

        return plot_trace(self.mean_trace(), path, normalise=False)


def model_is_right(vlm, example: Example) -> bool:
    """ROME's filter: the model's top first token is the first token of the expected answer."""
    top = int(torch.argmax(vlm.first_token_logits(example)))
    return top == vlm.encode_answer(example, example.answer)[0]


def trace_dataset(vlm, pairs: Iterable[tuple[str, Callable[[], tuple[Example, Example]]]], folder: "str | Path",
                  components=("lm.hidden",), tokens=("image", "question", "last"), skip_wrong: bool = True,
                  progress: bool = True, **trace_kw) -> DatasetTrace:
    """Trace every ``(key, make_pair)`` and keep each result in ``folder/<key>.json``.

    ``make_pair`` builds the (clean, corrupt) examples lazily, so a resumed run neither rebuilds
    nor recomputes finished keys. ``tokens`` should be token groups, which mean the same thing
    in every example (single positions do not). Examples the model answers wrongly are skipped
    and listed (``skip_wrong``), as ROME does.

    Under ``accelerate launch`` each process traces its share of the keys (every ``world``-th,
    :mod:`vlm_interp.parallel`), waits for the others and reads every key's file back, so each
    process returns the whole dataset; a key without a file after the run is an error.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = list(pairs)
    keys = unique_keys([key for key, _ in pairs], "trace_dataset")
    rank, world, state = process_rank()
    mine = [(key, make) for key, make in share(pairs, rank, world) if not _files(folder, key)]
    for key, make_pair in tqdm(mine, desc=f"trace dataset (rank {rank})" if world > 1 else "trace dataset",
                               disable=not progress):
        clean, corrupt = make_pair()
        if skip_wrong and not model_is_right(vlm, clean):
            record = {"key": key, "question": clean.question, "answer": clean.answer, "reason": "model answers otherwise"}
            atomic_write(folder / f"{key}.skipped.json", json.dumps(record))
            continue
        tr = trace(vlm, clean, corrupt, components=components, tokens=list(tokens), progress=False, **trace_kw)
        tr.attrs["key"] = key
        tr.save(folder / f"{key}.json")
    wait(state)
    traces, skipped, missing = [], [], []
    for key in keys:
        found = _files(folder, key)
        if not found:
            missing.append(key)
        elif found[0].name.endswith(".skipped.json"):
            skipped.append(json.loads(found[0].read_text()))
        else:
            traces.append(Trace.load(found[0]))
    if missing:
        raise VLMInterpError(f"{len(missing)} keys have no trace in {folder} after the run ({missing[:5]}); rerun "
                             "to resume")
    return DatasetTrace(traces, skipped)


def _files(folder: Path, key: str) -> list[Path]:
    """The result file of ``key`` (its trace, or the record of why it was skipped), or none; both is an error."""
    found = [p for p in (folder / f"{key}.json", folder / f"{key}.skipped.json") if p.exists()]
    if len(found) > 1:
        raise VLMInterpError(f"{folder} holds both a trace and a skip record for {key!r}; delete the one that is "
                             "wrong")
    return found
