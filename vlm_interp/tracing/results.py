"""Trace: a labelled array of effects (xarray) that saves, loads, averages and plots itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from ..files import atomic_path, atomic_write
from .metrics import recovery_rate


@dataclass
class Labelled:
    """A labelled array (xarray) with JSON-able metadata in ``attrs`` that saves and loads losslessly."""

    data: xr.DataArray

    @property
    def attrs(self) -> dict:
        return self.data.attrs

    def sel(self, **kw) -> xr.DataArray:
        return self.data.sel(**kw)

    # ---- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = self.data
        return {"dims": list(d.dims), "values": np.asarray(d.values).tolist(),
                "coords": {k: np.asarray(v.values).tolist() for k, v in d.coords.items()},
                "coord_dims": {k: list(v.dims) for k, v in d.coords.items()},
                "attrs": d.attrs, "name": d.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Labelled":
        coords = {k: (d["coord_dims"][k], v) for k, v in d["coords"].items()}
        return cls(xr.DataArray(np.array(d["values"], dtype=float), dims=d["dims"], coords=coords,
                                attrs=d["attrs"], name=d.get("name")))

    def save(self, path: "str | Path") -> Path:
        """Write JSON (``.json``) or NetCDF (``.nc``) atomically; both load back losslessly."""
        path = Path(path)
        if path.suffix != ".nc":
            return atomic_write(path, json.dumps(self.to_dict()))
        data = self.data.copy()
        data.attrs = {"vlm_interp": json.dumps(self.attrs)}
        with atomic_path(path) as tmp:
            data.to_netcdf(tmp, engine="netcdf4")
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "Labelled":
        path = Path(path)
        if path.suffix == ".nc":
            data = xr.load_dataarray(path, engine="netcdf4")
            data.attrs = json.loads(data.attrs["vlm_interp"])
            return cls(data)
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class Trace(Labelled):
    """Effects of restoring each cell, as ``data`` (dims such as component, layer, token or layer, head).

    ``data.attrs`` holds the metric, the clean and corrupted scores, the model, the answer and
    the corruption. ``rr()`` is the normalised recovery rate, ``indirect()`` the indirect effect
    (patched minus corrupted), ``total_effect`` the clean minus corrupted score.
    """

    @property
    def total_effect(self) -> float:
        return float(self.attrs["clean_score"] - self.attrs["corrupt_score"])

    def indirect(self) -> xr.DataArray:
        return self.data - self.attrs["corrupt_score"]

    def rr(self) -> xr.DataArray:
        return recovery_rate(self.data, self.attrs["clean_score"], self.attrs["corrupt_score"])

    def to_html(self, path: "str | Path | None" = None, example=None) -> "str | Path":
        """An interactive, self-contained HTML report of this trace: the text, or the file written at ``path``.

        ``example`` (the traced :class:`~vlm_interp.example.Example`) adds the image with the effect of
        each image token drawn over its patch, with a slider over layers.
        """
        from ..report import trace_page

        return trace_page(self, example, path)

    def plot(self, path: "str | Path", **kw) -> Path:
        """Draw the trace as heatmaps (layers x tokens, one per component) to ``path``; see
        :func:`~vlm_interp.tracing.plot.plot_trace` for the options. Makes missing folders; returns the path."""
        from .plot import plot_trace  # plotting imports matplotlib: only when a picture is wanted

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return plot_trace(self, path, **kw)

    def __repr__(self) -> str:
        a = self.attrs
        dims = ", ".join(f"{d}={n}" for d, n in self.data.sizes.items())
        scores = ""
        if "clean_score" in a and "corrupt_score" in a:
            scores = f", {a.get('metric', 'score')} clean {a['clean_score']:.4g} corrupted {a['corrupt_score']:.4g}"
        answer = f", answer {a['answer']!r}" if "answer" in a else ""
        return f"Trace({dims}{answer}{scores})"

    @classmethod
    def mean(cls, traces: Sequence["Trace"], dim: str = "example") -> xr.Dataset:
        """Mean, standard error and 95% interval of the recovery rate over ``traces`` (same labels)."""
        stacked = xr.concat([t.rr() for t in traces], dim=dim)
        n = stacked.sizes[dim]
        mean = stacked.mean(dim)
        sem = stacked.std(dim, ddof=1) / np.sqrt(n) if n > 1 else xr.zeros_like(mean)
        return xr.Dataset({"mean": mean, "sem": sem, "lo": mean - 1.96 * sem, "hi": mean + 1.96 * sem},
                          attrs={"n": n})
