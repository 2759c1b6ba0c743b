"""Shared by the report tests: reading back the figures a report page embeds, and small traced examples."""

from __future__ import annotations

import base64
import json

import numpy as np

QUESTION = "Is there a circle in the image?"


def figures(html: str) -> list[dict]:
    """Every ``Plotly.newPlot(id, data, layout, config)`` call of a page, as ``{"id", "data", "layout"}``."""
    decoder = json.JSONDecoder()
    out, start = [], 0
    while (start := html.find("Plotly.newPlot(", start)) >= 0:
        i = html.index('"', start)
        fig_id, i = decoder.raw_decode(html, i)
        i = html.index("[", i)
        data, i = decoder.raw_decode(html, i)
        i = html.index("{", i)
        layout, i = decoder.raw_decode(html, i)
        out.append({"id": fig_id, "data": data, "layout": layout})
        start = i
    return out


def array(value) -> np.ndarray:
    """A figure's array: plain JSON lists (null is NaN), or plotly's typed arrays (``bdata``, base64)."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):
            shape = [int(s) for s in shape.split(",")]
        return flat.reshape(shape).astype(float) if shape else flat.astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float) \
        if value and isinstance(value[0], list) else np.array([np.nan if v is None else v for v in value], dtype=float)


def tiny_trace(components=("lm.hidden", "lm.attn"), tokens="each"):
    """(vlm, clean example, trace) of tiny:llava with noise on the image embeddings (fast: a few hundred cells)."""
    import vlm_interp as vi
    from vlm_interp.corruptions import noise
    from vlm_interp.tracing import trace

    vlm = vi.load("tiny:llava")
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))
    ex = vlm.prepare(image, QUESTION, answer="yes", region=(4, 4, 20, 20))
    corrupt = noise(vlm, ex, scale=3.0, tokens="image", seed=1)
    return vlm, ex, trace(vlm, ex, corrupt, components=list(components), tokens=tokens, progress=False)
