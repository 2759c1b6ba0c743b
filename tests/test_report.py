"""The HTML report: what its figures hold (read back from the page, against numbers computed here), that it is
self-contained, the run manifest, and the demo's report of shapes-llava."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from vlm_interp.prompts import token_label

from report_pages import QUESTION, array, figures, tiny_trace


@pytest.fixture(scope="module")
def traced():
    return tiny_trace()


def by_hand_rr(tr, comp: str) -> np.ndarray:
    """Recovery rate (patched - corrupted) / (clean - corrupted), from the trace's raw values."""
    a = tr.attrs
    return (tr.data.sel(component=comp).transpose("layer", "position").values - a["corrupt_score"]) / \
        (a["clean_score"] - a["corrupt_score"])


def test_every_component_has_a_heatmap_holding_the_traces_numbers(traced):
    _, ex, tr = traced
    figs = figures(tr.to_html(example=ex))
    comps = list(tr.data.coords["component"].values)
    assert len(figs) == len(comps) + 1  # one heatmap per component, one image overlay
    image_cols = [k for k, g in enumerate(tr.data.coords["group"].values) if g in ("image",)]
    for fig, comp in zip(figs, comps):
        collapsed, expanded = fig["data"]
        expected = by_hand_rr(tr, comp)
        assert np.allclose(array(expanded["z"]), expected, atol=1e-5)
        assert collapsed["visible"] is True and expanded["visible"] is False  # collapsed first
        # the collapsed image column is the mean of the image tokens' columns, at the first image token's place
        z = array(collapsed["z"])
        assert z.shape[1] == expected.shape[1] - len(image_cols) + 1
        assert np.allclose(z[:, image_cols[0]], expected[:, image_cols].mean(axis=1), atol=1e-5)
        # hover data: each column's token (position and text), the site, and the raw metric beside the recovery rate
        assert expanded["x"][:3] == [f"{p}: {token_label(ex.tokens[p])}" for p in range(3)]
        assert expanded["x"][image_cols[0]] == f"{image_cols[0]}: {token_label(ex.tokens[image_cols[0]])} (image)"
        assert collapsed["x"][image_cols[0]] == f"<image> x{len(image_cols)}"
        assert np.allclose(array(expanded["customdata"]), tr.data.sel(component=comp).values, atol=1e-5)
        for part in ("token %{x}", "layer %{y}", f"site lm.{comp}.%{{y}}", "recovery rate %{z:.3f}"):
            assert part in expanded["hovertemplate"]
        buttons = fig["layout"]["updatemenus"][0]["buttons"]
        assert [b["label"] for b in buttons] == ["image collapsed", "all tokens"]


def test_the_overlay_puts_each_image_tokens_effect_on_its_patch_at_every_layer(traced):
    _, ex, tr = traced
    overlay = figures(tr.to_html(example=ex))[-1]
    image, *maps = overlay["data"]
    assert image["type"] == "image" and image["source"].startswith("data:image/png;base64,")
    assert [m["name"] for m in maps] == ["lm.hidden", "lm.attn"]
    heat = maps[0]
    xs, ys = heat["x"], heat["y"]
    steps = overlay["layout"]["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == [str(l) for l in range(tr.data.sizes["layer"])]
    expected = by_hand_rr(tr, "hidden")
    positions = [p[0] for p in tr.attrs["positions"]]
    for layer, step in enumerate(steps):
        z = array(step["args"][0]["z"][0])  # the first map (lm.hidden) at this layer
        for pos in ex.groups["lm"]["image"]:
            y0, x0, y1, x1 = ex.boxes["lm"][pos]
            cell = z[ys.index(y0), xs.index(x0)]
            assert np.isclose(cell, expected[layer, positions.index(pos)], atol=1e-5), (layer, pos)


def test_the_page_is_self_contained_with_plotly_inlined_once(traced, tmp_path):
    from plotly.offline import get_plotlyjs

    _, ex, tr = traced
    path = tr.to_html(tmp_path / "trace.html", example=ex)
    html = path.read_text(encoding="utf-8")
    assert html.count(get_plotlyjs()) == 1
    ours = html.replace(get_plotlyjs(), "")  # the page around plotly's own script (which loads nothing unasked)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|<img[^>]+src=\"(?!data:)|url\((?!data:)", ours)
    assert "cdn." not in ours.lower() and "https://" not in ours and "http://" not in ours
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left beside it


def test_a_trace_of_token_groups_says_why_it_has_no_overlay(traced):
    _, ex, _ = traced
    _, _, tr = tiny_trace(components=("lm.hidden",), tokens=["image", "last"])
    html = tr.to_html(example=ex)
    assert len(figures(html)) == 1 and "No image overlay" in html


def test_head_traces_become_layer_by_head_maps_with_a_token_slider():
    _, _, tr = tiny_trace(components=("lm.head",), tokens=["image", "last"])
    figs = figures(tr.to_html())
    assert len(figs) == 1
    fig = figs[0]
    rr = (tr.data.sel(component="head").values - tr.attrs["corrupt_score"]) / tr.total_effect
    assert np.allclose(array(fig["data"][0]["z"]), rr[:, :, 0], atol=1e-5)
    steps = fig["layout"]["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == ["0: image", "1: last"]
    assert np.allclose(array(steps[1]["args"][0]["z"][0]), rr[:, :, 1], atol=1e-5)


def comparison_frames():
    table = pd.DataFrame([{"system": s, "intervention": "none", "split": sp, "source": src, "accuracy": acc,
                           "accuracy_lo": acc - 0.05, "accuracy_hi": acc + 0.04, "f1": acc - 0.01,
                           "f1_lo": acc - 0.06, "f1_hi": acc + 0.03, "yes_ratio": 0.5, "n": 100}
                          for s, base in (("A", 0.9), ("B", 0.8)) for k, sp in enumerate(("random", "adversarial"))
                          for src, acc in (("logits", base - 0.1 * k), ("generation", base - 0.1 * k - 0.02))])
    tests = pd.DataFrame([{"a": "A", "b": "B", "split": "random", "n": 100, "only_a": 12, "only_b": 2,
                           "p_value": 0.0129, "source": "logits"}])
    return table, tests


def test_comparison_report_has_the_table_with_intervals_grouped_bars_and_paired_tests(tmp_path):
    from vlm_interp.hallucination.compare import Comparison

    table, tests = comparison_frames()
    html = Comparison(table, tests, {}).to_html(tmp_path / "c.html").read_text()
    assert "0.900 [0.850, 0.940]" in html and "0.0129" in html
    figs = figures(html)
    assert [f["layout"]["title"]["text"] for f in figs] == ["POPE accuracy (logits)", "POPE accuracy (generation)"]
    bars = {d["name"]: d for d in figs[0]["data"]}
    assert list(bars["B"]["x"]) == ["random", "adversarial"]
    assert np.allclose(array(bars["B"]["y"]), [0.8, 0.7])
    assert np.allclose(array(bars["B"]["error_y"]["array"]), [0.04, 0.04])
    assert np.allclose(array(bars["B"]["error_y"]["arrayminus"]), [0.05, 0.05])


def test_other_labelled_results_are_drawn_by_their_dimensions():
    import xarray as xr

    from vlm_interp.report import labelled_sections
    from vlm_interp.tracing.results import Labelled

    rng = np.random.default_rng(0)
    knock = Labelled(xr.DataArray(rng.random((3, 2, 4)), dims=["layer", "edge", "head"], name="knockout",
                                  coords={"layer": [0, 1, 2], "edge": ["image->last", "object->last"],
                                          "head": [0, 1, 2, 3]}, attrs={"question": QUESTION, "clean_score": 0.9}))
    (section,) = labelled_sections(knock, "Knockout")
    (fig,) = [p for p in section.parts if not isinstance(p, str)]
    assert np.allclose(array(fig.to_plotly_json()["data"][0]["z"]), knock.data.values[:, :, 0], atol=1e-5)
    assert len(fig.layout.sliders[0].steps) == 4
    lens = Labelled(xr.DataArray(rng.random((1, 2, 3, 5)), dims=["component", "quantity", "layer", "position"],
                                 coords={"component": ["hidden"], "quantity": ["prob", "rank"], "layer": [0, 1, 2],
                                         "position": [0, 1, 2, 3, 4], "token": ("position", list("abcde")),
                                         "group": ("position", ["text", "image", "image", "image", "last"])},
                                 attrs={"top_tokens": {"hidden": [[[f"t{l}{p}", "x"] for p in range(5)]
                                                                  for l in range(3)]}}))
    boxes = {"lm": {1: (0, 0, 8, 8), 2: (0, 8, 8, 16), 3: (8, 0, 16, 8)}}
    from PIL import Image

    (section,) = labelled_sections(lens, "Logit lens", Image.new("RGB", (16, 16)), boxes)
    kinds = [type(p).__name__ for p in section.parts if not isinstance(p, str)]
    assert kinds == ["Figure"] * 4  # per quantity: a token heatmap and an image overlay
    expanded = [p for p in section.parts if not isinstance(p, str)][0].to_plotly_json()["data"][1]  # prob, all tokens
    assert expanded["text"][2][4] == "t24 | x"  # the lens's top tokens at layer 2, position 4
    with pytest.raises(ValueError, match="needs a 'layer' dimension"):
        labelled_sections(Labelled(xr.DataArray(np.zeros(3), dims=["x"])), "odd")


def test_trace_command_writes_a_manifest_listing_existing_files_and_a_report(tmp_path, capsys):
    from vlm_interp.cli import main
    from vlm_interp.runs import RunFolderError, read_manifest, report_run, write_manifest

    out = tmp_path / "run"
    assert main(["trace", "--model", "tiny:llava", "--image", "shapes:3", "--question", QUESTION,
                 "--components", "hidden", "--out", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == "trace" and manifest["model"]["name"] == "tiny:llava"
    assert manifest["corruption"] == "noise" and manifest["settings"]["components"] == ["lm.hidden"]
    assert {"torch", "transformers", "plotly", "vlm-interp"} <= set(manifest["versions"])
    assert {"trace.json", "trace.png", "summary.json", "example.json", "image.png"} <= set(manifest["files"])
    assert all((out / name).is_file() for name in manifest["files"])
    assert manifest["results"] == [{"file": "trace.json", "kind": "trace", "title": "Causal trace (noise)"}]
    assert len(figures((out / "report.html").read_text())) == 2  # lm.hidden and the overlay
    # the report command rebuilds it from the folder alone
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert figures((tmp_path / "again.html").read_text())[0]["data"] == \
        figures((out / "report.html").read_text())[0]["data"]
    (out / "trace.png").unlink()
    with pytest.raises(RunFolderError, match="trace.png"):
        read_manifest(out)
    with pytest.raises(RunFolderError, match="missing.json"):
        write_manifest(out, "trace", results=[{"file": "missing.json", "kind": "trace"}])
    with pytest.raises(RunFolderError, match="no run.json"):
        read_manifest(tmp_path)
    (out / "trace.png").write_bytes(b"")
    (out / "notes.json").write_text('{"text": "not a result"}')
    write_manifest(out, "trace", results=[{"file": "notes.json", "kind": "notes"}])
    with pytest.raises(RunFolderError, match="kind 'notes'.*not a labelled result"):
        report_run(out)


def test_demo_report_shows_shapes_llava_reading_the_object_at_the_lm_input(tmp_path):
    """Done-when: on the demo's real trace, the overlay's strongest patch at lm.input layer 0 (where the
    organism's LM reads the scene code) lies on the asked object; a full report stays under 8 MB."""
    from vlm_interp.cli import main
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World

    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = tmp_path / "report.html"
    assert report.stat().st_size < 8e6
    figs = figures(report.read_text())
    overlay = next(f for f in figs if f["data"][0]["type"] == "image")
    names = [d["name"] for d in overlay["data"][1:]]
    z = array(overlay["layout"]["sliders"][0]["steps"][0]["args"][0]["z"][names.index("lm.input")])
    row, col = np.unravel_index(np.nanargmax(z), z.shape)
    xs, ys = overlay["data"][1]["x"], overlay["data"][1]["y"]
    mask = World(ORGANISM_WORLD).scene(1).objects[0].mask  # the demo asks about the first object of seed 1
    assert mask[int(ys[row]):int(ys[row + 1]), int(xs[col]):int(xs[col + 1])].any()
    # and it stands out: at least twice the mean of the patches off the object
    off = [z[r, c] for r in range(z.shape[0]) for c in range(z.shape[1])
           if not mask[int(ys[r]):int(ys[r + 1]), int(xs[c]):int(xs[c + 1])].any()]
    assert z[row, col] > 2 * np.nanmean(np.abs(off))
    assert any("head" in f["layout"]["title"]["text"] for f in figs)  # the head maps


def test_ci_installs_the_browser_before_the_test_command():
    from test_cli import ROOT, readme_commands

    ci = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in ci  # so that the browser tests fail rather than skip without Chromium
    assert ci.index("apt-get install -y -qq chromium chromium-driver") < ci.index(readme_commands()[1])


def test_trace_dataset_reports_its_mean_recovery_rate_without_renormalising(tmp_path):
    from vlm_interp.cli import main
    from vlm_interp.tracing import Trace

    out = tmp_path / "ds"
    assert main(["trace-dataset", "--model", "zoo:shapes-llava", "--n", "2", "--components", "hidden",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == "trace-dataset" and manifest["results"][0]["file"] == "mean_trace.json"
    assert all((out / name).is_file() for name in manifest["files"])
    mean = Trace.load(out / "mean_trace.json")
    (heat,) = figures((out / "report.html").read_text())
    assert np.allclose(array(heat["data"][-1]["z"]), mean.data.sel(component="hidden").values, atol=1e-5)


def test_compare_command_writes_a_manifest_and_a_report_of_its_table(tmp_path):
    from vlm_interp.cli import main
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    questions, out = tmp_path / "pope", tmp_path / "compare"
    write_pope(World(ORGANISM_WORLD), questions, n_images=2, seed=3, per_image=1)
    assert main(["compare", "--models", "tiny:llava", "--questions", str(questions), "--splits", "random",
                 "--max-new-tokens", "2", "--out", str(out), "--intervention", "damp=scale:lm.head.0.0=0"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == "compare" and manifest["inputs"]["models"] == ["tiny:llava"]
    assert {"table.csv", "tests.csv", "table.md", "compare.png"} <= set(manifest["files"])
    table = pd.read_csv(out / "table.csv")
    html = (out / "report.html").read_text()
    figs = figures(html)
    assert len(figs) == table["source"].nunique()
    for fig in figs:
        source = fig["layout"]["title"]["text"].split("(")[1].rstrip(")")
        for bar in fig["data"]:
            rows = table[(table.source == source) & (table.system == bar["name"])]
            assert np.allclose(array(bar["y"]), rows["accuracy"].values)
    tests = pd.read_csv(out / "tests.csv")
    assert len(tests) == 2 and f"{tests.p_value.iloc[0]:.4f}" in html  # plain vs damped, logits and generation


def test_compare_over_several_benchmarks_reports_its_long_table(tmp_path):
    from vlm_interp.cli import main

    out = tmp_path / "suite"
    assert main(["compare", "--models", "tiny:llava", "--benchmark", "pope", "chair", "--images", "2", "--splits",
                 "random", "--max-new-tokens", "2", "--caption-tokens", "4", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["benchmark"] == ["pope", "chair"]
    table = pd.read_csv(out / "table.csv")
    html = (out / "report.html").read_text()
    figs = figures(html)
    assert {f["layout"]["title"]["text"] for f in figs} >= {"pope: accuracy (logits)", "chair: chair_i (generation)"}
    for fig in figs:
        part, rest = fig["layout"]["title"]["text"].split(": ")
        metric, source = rest.rstrip(")").split(" (")
        (bar,) = fig["data"]
        rows = table[(table.benchmark == part) & (table.metric == metric) & (table.source == source)]
        assert np.allclose(array(bar["y"]), rows["value"].values)
    first = table.iloc[0]
    assert f"{first.value:.3f} [{first.lo:.3f}, {first.hi:.3f}]" in html


@pytest.mark.parametrize("command", ["lens", "knockout", "attention"])
def test_method_commands_write_a_manifest_and_a_report_of_their_result(tmp_path, command):
    from vlm_interp.cli import main
    from vlm_interp.tracing.results import Labelled

    out = tmp_path / command
    extra = ["--knockout"] if command == "attention" else []
    assert main([command, "--model", "tiny:llava", "--image", "shapes:3", "--question", QUESTION, "--out", str(out),
                 *extra]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == command and all((out / f).is_file() for f in manifest["files"])
    result = Labelled.load(out / manifest["results"][0]["file"])
    shown = figures((out / "report.html").read_text())[0]["data"][-1]  # the first chart's every-token heatmap
    data = result.data
    expected = {"lens": lambda: data.sel(component="hidden", quantity="prob").values,
                "knockout": lambda: data.transpose("layer", "edge").values,  # no head axis by default
                "attention": lambda: data.mean("head").transpose("layer", "position").values}[command]()
    assert np.allclose(array(shown["z"]), expected, atol=1e-5)


def test_token_labels_read_as_text():
    """Byte-level BPE and SentencePiece marks become spaces and are stripped; white-space tokens stay visible."""
    assert [token_label(t) for t in ["\u0120diamond", "\u010a", "\u2581the", "<image>", "\u0120", "?"]] == \
        ["diamond", "\\n", "the", "<image>", "\u2423", "?"]


def test_the_overlay_shows_the_site_and_layer_where_one_image_token_matters_most():
    """The demo's overlay picks the (component, layer) with the largest single-image-token recovery, by hand."""
    import numpy as np

    from vlm_interp.figures import signed_limits
    from vlm_interp.tracing.plot import strongest_image_site

    _, _, tr = tiny_trace()
    rr = tr.rr()
    cols = [k for k, g in enumerate(rr.coords["group"].values) if g in ("image", "object")]
    best = max(((str(c), j) for c in rr.coords["component"].values for j in range(rr.sizes["layer"])),
               key=lambda cl: float(np.nanmax(rr.sel(component=cl[0]).values[cl[1], cols])))
    assert strongest_image_site(tr) == best
    assert strongest_image_site(tr, layer=0)[1] == 0
    low, high = signed_limits(np.array([[-0.2, 0.5], [np.nan, 0.1]]))
    assert (low, high) == (-0.5, 0.5)  # centred at zero: a signed effect reads by its colour's side
