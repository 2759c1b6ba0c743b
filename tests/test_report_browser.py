"""The report in a real browser: Debian's headless Chromium driven by selenium (no browser downloads).

Without Chromium (or selenium) these tests skip on a developer machine and fail when ``CI=true``. The
driver is benchmarks/bench_report.py's (started with --disable-background-networking, so the browser's
own traffic is not counted). Screenshots go to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from report_pages import QUESTION, figures, tiny_trace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"


def _missing() -> str:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser")):
        return "Chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not shutil.which("chromedriver") and not Path("/usr/lib/chromium/chromedriver").exists():
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    return ""


if _missing():
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests must run in CI: {_missing()}", pytrace=False)
    pytest.skip(_missing(), allow_module_level=True)

spec = importlib.util.spec_from_file_location("bench_report", BENCH)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """tiny:llava reports on disk: a trace (with the image overlay), a comparison, the logit lens, and attention
    maps with knockout (the last two written by their commands)."""
    from test_report import comparison_frames

    from vlm_interp.cli import main
    from vlm_interp.hallucination.compare import Comparison

    folder = tmp_path_factory.mktemp("reports")
    _, ex, tr = tiny_trace()
    table, tests = comparison_frames()
    for command in ("lens", "attention"):
        main([command, "--model", "tiny:llava", "--image", "shapes:3", "--question", QUESTION,
              "--out", str(folder / command)] + (["--knockout"] if command == "attention" else []))
    return {"trace": tr.to_html(folder / "trace.html", example=ex), "compare":
            Comparison(table, tests, {}).to_html(folder / "compare.html"), "example": ex, "trace_result": tr,
            "lens": folder / "lens" / "report.html", "attention": folder / "attention" / "report.html"}


@pytest.fixture(scope="module")
def driver():
    d = bench.chromium(1300, 1000)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-screenshots")


def open_page(driver, path: Path) -> None:
    driver.get_log("browser"), driver.get_log("performance")  # start from empty logs
    driver.get(path.resolve().as_uri())
    bench.wait_rendered(driver)


def requests(driver) -> list[str]:
    """URLs of every request the page sent, from the DevTools protocol's Network events."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@pytest.mark.parametrize("name", ["trace", "compare", "lens", "attention"])
def test_page_loads_offline_without_console_errors_and_every_chart_renders(driver, pages, shots, name):
    open_page(driver, pages[name])
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    urls = requests(driver)
    assert any(u.startswith("file://") for u in urls), "the DevTools log saw no request at all (not recording?)"
    assert [u for u in urls if not u.startswith(("file://", "data:", "blob:"))] == []
    drawn = driver.execute_script("""return Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => {
        const marks = Array.from(d.querySelectorAll('.cartesianlayer image, .cartesianlayer .trace path'))
            .filter(e => { const b = e.getBBox(); return b.width > 0 && b.height > 0; });
        return [d.id, marks.length, d.getBoundingClientRect().height]; });""")
    assert len(drawn) == len(figures(pages[name].read_text())) > 0
    assert all(marks > 0 and height > 100 for _, marks, height in drawn), drawn
    driver.save_screenshot(str(shots / f"{name}.png"))


def test_hovering_a_heatmap_cell_shows_its_token_layer_site_and_value(driver, pages):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(driver, pages["trace"])
    ex, tr = pages["example"], pages["trace_result"]
    layer = 1
    rr = (tr.data.sel(component="hidden", layer=layer).values - tr.attrs["corrupt_score"]) / tr.total_effect
    columns = driver.execute_script("return document.getElementById('figure-1').data[0].x.length")
    column = columns - 1  # the last token
    x, y, width, height = driver.execute_script(f"""const gd = document.getElementById('figure-1');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
        return [xa._offset + xa.l2p({column}), ya._offset + ya.l2p({layer}), r.width, r.height];""")
    element = driver.find_element(By.ID, "figure-1")
    ActionChains(driver).move_to_element_with_offset(element, int(x - width / 2), int(y - height / 2)).perform()
    deadline = time.time() + 5
    text = ""
    while time.time() < deadline and not text:
        text = driver.execute_script("const h = document.querySelector('#figure-1 .hoverlayer .hovertext');"
                                     "return h ? h.textContent : '';")
    assert f"token {len(ex.tokens) - 1}: {ex.tokens[-1]}" in text
    assert f"layer {layer}" in text and f"site lm.hidden.{layer}" in text
    assert f"recovery rate {rr[-1]:.3f}" in text


def test_moving_the_layer_slider_changes_the_overlay(driver, pages, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(driver, pages["trace"])
    tr = pages["trace_result"]
    overlay = "figure-3"
    state = f"""const gd = document.getElementById('{overlay}');
        const img = gd.querySelector('.cartesianlayer .hm image');
        return [gd.layout.sliders[0].active, JSON.stringify(gd.data[1].z), img ? img.getAttribute('href') : null];"""
    active, z_before, picture_before = driver.execute_script(state)
    assert picture_before
    n_layers = tr.data.sizes["layer"]
    target = 0 if active == n_layers - 1 else n_layers - 1
    rail = driver.find_element(By.CSS_SELECTOR, f"#{overlay} .slider-rail-touch-rect")
    width = rail.size["width"]
    offset = int(width / 2 - 8) if target == n_layers - 1 else int(-width / 2 + 8)
    ActionChains(driver).move_to_element_with_offset(rail, offset, 0).click().perform()
    deadline = time.time() + 5
    while time.time() < deadline and driver.execute_script(state)[0] != target:
        time.sleep(0.05)
    active_after, z_after, picture_after = driver.execute_script(state)
    assert active_after == target
    assert z_after != z_before and picture_after != picture_before  # new numbers, and a newly drawn picture
    ex = pages["example"]
    rr = (tr.data.sel(component="hidden", layer=target).values - tr.attrs["corrupt_score"]) / tr.total_effect
    shown = np.array([[np.nan if v is None else v for v in row] for row in json.loads(z_after)])
    xs, ys = driver.execute_script(f"const d = document.getElementById('{overlay}').data[1]; return [d.x, d.y];")
    positions = [p[0] for p in tr.attrs["positions"]]
    pos = ex.groups["lm"]["image"][-1]
    y0, x0, _, _ = ex.boxes["lm"][pos]
    assert np.isclose(shown[ys.index(y0), xs.index(x0)], rr[positions.index(pos)], atol=1e-4)
    driver.save_screenshot(str(shots / "overlay-moved.png"))


def test_the_request_count_sees_a_page_that_loads_something(driver, tmp_path):
    """The network check can fail: a page with a remote image shows that request (the browser is offline here or
    not; the request is counted when it is sent)."""
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><body><img src="https://example.invalid/x.png"></body></html>')
    driver.get_log("performance")
    driver.get(page.as_uri())
    assert "https://example.invalid/x.png" in requests(driver)


def test_the_all_tokens_button_expands_the_image_column(driver, pages):
    from selenium.webdriver.common.by import By

    open_page(driver, pages["trace"])
    tr = pages["trace_result"]
    n_image = sum(g == "image" for g in tr.data.coords["group"].values)
    shown = "return document.getElementById('figure-1')._fullLayout.xaxis._categories.length"
    assert driver.execute_script(shown) == tr.data.sizes["position"] - n_image + 1
    button = next(b for b in driver.find_elements(By.CSS_SELECTOR, "#figure-1 .updatemenu-button")
                  if b.text == "all tokens")
    button.click()
    deadline = time.time() + 5
    while time.time() < deadline and driver.execute_script(shown) != tr.data.sizes["position"]:
        time.sleep(0.05)
    assert driver.execute_script(shown) == tr.data.sizes["position"]
