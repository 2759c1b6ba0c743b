"""Head-level results: which attention heads matter (NOTICE's mean + 2 std criterion)."""

from __future__ import annotations

import pandas as pd

from .results import Trace


def important_heads(trace: Trace, k: float = 2.0, normalise: bool = True) -> pd.DataFrame:
    """Heads whose effect exceeds the mean plus ``k`` standard deviations over all heads of the trace.

    Works per component (``head`` or ``xattn_head``) and token-axis entry; returns the selected
    heads with their effect and the threshold, strongest first.
    """
    if "head" not in trace.data.dims:
        raise ValueError("this trace has no head dimension; trace a head component such as 'lm.head'")
    data = trace.rr() if normalise else trace.data
    rows = []
    for comp in data.coords["component"].values:
        for k_pos in range(data.sizes["position"]):
            grid = data.sel(component=comp).isel(position=k_pos)
            values = grid.values
            threshold = float(pd.Series(values.ravel()).mean() + k * pd.Series(values.ravel()).std(ddof=0))
            for layer in range(values.shape[0]):
                for head in range(values.shape[1]):
                    v = values[layer, head]
                    if v == v and v > threshold:
                        rows.append({"component": str(comp), "token": str(data.coords["token"].values[k_pos]),
                                     "layer": layer, "head": head, "effect": float(v), "threshold": threshold,
                                     "site": f"{trace.attrs['tower']}." + (f"head.{layer}.{head}" if comp == "head"
                                                                            else f"xattn.{layer}.head.{head}")})
    return pd.DataFrame(rows).sort_values("effect", ascending=False).reset_index(drop=True) if rows else \
        pd.DataFrame(columns=["component", "token", "layer", "head", "effect", "threshold", "site"])
