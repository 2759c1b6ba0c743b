"""What a newcomer reaches from the package root: trace, noise, plot_trace, and a Trace that plots and prints."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def small_trace():
    import vlm_interp as vi

    vlm = vi.load("tiny:llava")
    scene = vi.zoo.scene(3)
    ex = vlm.prepare(scene.pil(), vi.zoo.existence_question(scene.objects[0].shape), answer="yes")
    bad = vi.noise(vlm, ex, scale="3sd", tokens="image", seed=0)
    return vi.trace(vlm, ex, bad, components=["lm.hidden"], tokens=["image", "last"], progress=False)


def test_the_root_re_exports_the_main_job():
    import vlm_interp as vi
    from vlm_interp.corruptions import noise
    from vlm_interp.tracing import Trace, trace
    from vlm_interp.tracing.plot import plot_trace

    assert (vi.noise, vi.trace, vi.Trace, vi.plot_trace) == (noise, trace, Trace, plot_trace)
    assert {"noise", "trace", "Trace", "plot_trace"} <= set(vi.__all__)


def test_a_trace_plots_itself(small_trace, tmp_path):
    written = small_trace.plot(tmp_path / "sub" / "trace.png")
    assert written == tmp_path / "sub" / "trace.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written.stat().st_size > 1000
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["trace.png"]  # written atomically, no leftovers


def test_a_trace_prints_in_one_short_line(small_trace):
    text = repr(small_trace)
    assert "\n" not in text and len(text) < 200
    assert text.startswith("Trace(component=1, layer=2, position=2")
    assert "answer 'yes'" in text and "clean" in text and "corrupted" in text
    assert f"clean {small_trace.attrs['clean_score']:.4g} " in text
