"""Regenerate the README's screenshot of the demo's report (docs/report.png).

    python scripts/report_screenshot.py [--out docs/report.png]

Runs ``vlm-interp demo`` into a temporary folder, opens its report.html in headless Chromium (Debian's
chromium and chromium-driver, through benchmarks/bench_report.py's driver) and joins two figures side by
side: the lm.input heatmap and the image overlay at the layer where image tokens matter most (about 100 kB).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def shoot(report: Path, out: Path) -> Path:
    from PIL import Image
    from selenium.webdriver.common.by import By

    from vlm_interp.files import atomic_write

    bench = _bench()
    driver = bench.chromium(1400, 1200)
    try:
        driver.get(report.resolve().as_uri())
        bench.wait_rendered(driver)
        pictures = []
        for fig_id in ("figure-1", driver.execute_script(
                "return Array.from(document.querySelectorAll('.plotly-graph-div'))"
                ".find(d => d.data[0].type === 'image').id")):
            element = driver.find_element(By.ID, fig_id)
            driver.execute_script("arguments[0].scrollIntoView();", element)
            pictures.append(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))
    finally:
        driver.quit()
    heat, overlay = pictures
    heat = heat.resize((int(heat.width * overlay.height / heat.height * 0.55), int(overlay.height * 0.55)))
    canvas = Image.new("RGB", (heat.width + overlay.width, overlay.height), "white")
    canvas.paste(heat, (0, (overlay.height - heat.height) // 2))
    canvas.paste(overlay, (heat.width, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return atomic_write(out, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    args = parser.parse_args()
    from vlm_interp.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        cli(["demo", "--out", tmp])
        path = shoot(Path(tmp) / "report.html", args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
