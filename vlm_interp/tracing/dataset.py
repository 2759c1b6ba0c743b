"""Dataset-level tracing: many examples, averaged effects with intervals, checkpointed and resumable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import xarray as xr
from tqdm.auto import tqdm

from ..example import Example
from ..files import atomic_write
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
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    traces, skipped = [], []
    for key, make_pair in tqdm(list(pairs), desc="trace dataset", disable=not progress):
        done, skip = folder / f"{key}.json", folder / f"{key}.skipped.json"
        if done.exists():
            traces.append(Trace.load(done))
            continue
        if skip.exists():
            skipped.append(json.loads(skip.read_text()))
            continue
        clean, corrupt = make_pair()
        if skip_wrong and not model_is_right(vlm, clean):
            record = {"key": key, "question": clean.question, "answer": clean.answer, "reason": "model answers otherwise"}
            atomic_write(skip, json.dumps(record))
            skipped.append(record)
            continue
        tr = trace(vlm, clean, corrupt, components=components, tokens=list(tokens), progress=False, **trace_kw)
        tr.attrs["key"] = key
        traces.append(Trace.load(tr.save(done)))
    return DatasetTrace(traces, skipped)
