"""How long headless Chromium takes to load and render a report (not a timed test; numbers go to stdout).

    python benchmarks/bench_report.py                  # traces zoo:shapes-llava as the demo does, then measures
    python benchmarks/bench_report.py --report FILE    # an existing report.html

Load is the page's ``loadEventEnd`` (the inlined plotly script parsed and run, the figures' calls made);
render is until every figure div holds a drawn plot (plotly's ``_fullLayout`` and an SVG), both on the page's
own clock from the start of navigation. Repeats open the file afresh; the median and best are printed with
the file size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

RENDERED = """return Array.from(document.querySelectorAll('.plotly-graph-div'))
    .every(d => d._fullLayout && d.querySelector('svg.main-svg'));"""


def chromium(width: int = 1300, height: int = 1000):
    """Headless Chromium through chromedriver (Debian's chromium and chromium-driver), no background traffic,
    with browser and DevTools performance logs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", f"--window-size={width},{height}"):
        options.add_argument(flag)
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(path).exists():
            options.binary_location = path
            break
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver_path = next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).exists()),
                       None)
    return webdriver.Chrome(options=options, service=Service(driver_path) if driver_path else Service())


def wait_rendered(driver, timeout: float = 60.0) -> float:
    """Seconds until every figure is drawn (raises TimeoutError after ``timeout``)."""
    start = time.perf_counter()
    while not driver.execute_script(RENDERED):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the report's figures were not all drawn after {timeout} s")
        time.sleep(0.01)
    return time.perf_counter() - start


def measure(path: Path, repeats: int = 5) -> dict:
    driver = chromium()
    try:
        loads, renders = [], []
        for _ in range(repeats):
            driver.get("about:blank")
            driver.get(path.resolve().as_uri())  # returns after the load event
            wait_rendered(driver)
            # the page's own clock, from the start of navigation: the load event's end, and now (every figure drawn;
            # the polling adds up to a few tens of milliseconds)
            loaded, drawn = driver.execute_script(
                "return [performance.getEntriesByType('navigation')[0].loadEventEnd, performance.now()];")
            loads.append(loaded / 1000)
            renders.append(drawn / 1000)
        figures = driver.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    finally:
        driver.quit()
    return {"size_mb": path.stat().st_size / 1e6, "figures": figures, "load_median_s": statistics.median(loads),
            "load_best_s": min(loads), "render_median_s": statistics.median(renders), "render_best_s": min(renders)}


def demo_report(folder: Path) -> Path:
    from vlm_interp.cli import main

    main(["demo", "--out", str(folder)])
    return folder / "report.html"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="an existing report.html (default: run the demo first)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.report or demo_report(Path(tmp) / "demo")
        result = measure(path, args.repeats)
    print(f"report {result['size_mb']:.2f} MB, {result['figures']} figures; "
          f"Chromium load {result['load_median_s']:.2f} s "
          f"(best {result['load_best_s']:.2f}), load + render {result['render_median_s']:.2f} s "
          f"(best {result['render_best_s']:.2f}), median of {args.repeats}")


if __name__ == "__main__":
    main()
