"""The project's text: no development-process wording, and a README whose Python examples run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The word is assembled here so that this file does not trip its own check.
WORD = "sess" + "ion"
# Technical uses of the word that are allowed, each matched on its own line: pytest's fixture scope, a WebDriver
# one, a requests one. Any other line with the word is development-process text.
ALLOWED = (
    re.compile(r"""scope=["']%s["']""" % WORD),
    re.compile(r"webdriver\.\w+\(\)\.%s|driver\.%s_id" % (WORD, WORD), re.I),
    re.compile(r"requests\.%s\b" % WORD.title()),
)
PROCESS_WORD = re.compile(WORD, re.I)
ISSUE_NUMBER = re.compile(r"\bissues?\s*(#|no\.?\s*|number\s*)\d+", re.I)
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".json", ".jsonl", ".csv", ".sh",
                 ".html", ".css", ".js", ""}


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = []
    for name in filter(None, names.split("\0")):
        path = ROOT / name
        if path.suffix in TEXT_SUFFIXES and path.is_file() and path.stat().st_size < 5_000_000:
            files.append(path)
    return files


def process_lines(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: text' for every line of ``path`` that speaks of that word or of issue numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        process = PROCESS_WORD.search(line) and not any(allowed.search(line) for allowed in ALLOWED)
        if process or ISSUE_NUMBER.search(line):
            found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:120]}")
    return found


def test_the_checker_catches_process_text_and_spares_technical_uses(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text(f"Measured in {WORD.title()} 4 on the old checkpoint.\nSee issue #"
                   "12 for the plan.\nfine line\n")
    found = process_lines(bad, tmp_path)
    assert [line.split(":")[1] for line in found] == ["1", "2"]
    good = tmp_path / "good.py"
    good.write_text(f'@pytest.fixture(scope="{WORD}")\ndef f(): pass\ns = requests.{WORD.title()}()\n')
    assert process_lines(good, tmp_path) == []


def test_no_tracked_text_speaks_of_development_process():
    files = tracked_text_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    found = [line for f in files for line in process_lines(f)]
    assert not found, "development-process text in tracked files:\n" + "\n".join(found)


def readme_python_blocks() -> list[tuple[str, str]]:
    """(info string, code) of every ```python block of the README."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```(python[^\n]*)\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_marks_hub_blocks_and_keeps_a_runnable_example():
    blocks = readme_python_blocks()
    runnable = [code for info, code in blocks if info.strip() == "python"]
    assert runnable and "zoo:shapes-llava" in runnable[0]
    for info, code in blocks:
        loads_hub = re.search(r"""load\(\s*["'][\w.-]+/[\w.-]+["']""", code)
        assert not loads_hub or "notest" in info, f"a block that loads a hub checkpoint is not marked notest:\n{code}"


@pytest.mark.parametrize("index", range(sum(info.strip() == "python" for info, _ in readme_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    import os
    import sys

    code = [code for info, code in readme_python_blocks() if info.strip() == "python"][index]
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{code}\n{done.stderr[-3000:]}"
    for name in re.findall(r"""\.plot\(\s*["']([^"']+)["']""", code):
        assert (tmp_path / name).stat().st_size > 1000  # the pictures the block promises exist


def test_every_relative_link_of_the_readme_points_at_a_file():
    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert any(link.startswith("docs/methods/") for link in links)
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to files that do not exist: {missing}"


METHOD_PAGES = ["causal-tracing", "attribution-patching", "logit-lens", "attention-knockout", "attention-maps",
                "head-modulation", "vhr", "iri", "vcd", "pai", "hallucination", "corruptions"]


@pytest.mark.parametrize("page", METHOD_PAGES)
def test_each_method_page_names_its_paper_what_it_computes_and_its_guarantees(page):
    text = (ROOT / "docs" / "methods" / f"{page}.md").read_text()
    assert re.search(r"^\*\*Papers?\.\*\* .*\(.*(19|20)\d\d\)", text, flags=re.M | re.S), "no paper with its year"
    assert re.search(r"^## What (it|each) computes?", text, flags=re.M)
    assert "## Exactness guarantees" in text
    assert f"methods/{page}.md" in (ROOT / "mkdocs.yml").read_text()  # and it is in the site's navigation


def test_research_records_have_a_date_and_a_checkpoint_hash():
    records = [p for p in (ROOT / "docs" / "research").rglob("*.md") if p.name != "index.md"]
    assert len(records) >= 8
    for record in records:
        text = record.read_text()
        assert re.search(r"20\d\d-\d\d-\d\d", text), f"{record.name}: no date"
        named = re.search(r"`[0-9a-f]{8}(?:[0-9a-f]{56})?`|sha256", text) or "weights were not kept" in text
        assert named, f"{record.name}: no checkpoint hash (nor a note that the weights were not kept)"


def test_the_docs_build_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    import os
    import sys

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "methods" / "causal-tracing" / "index.html").is_file()
    assert "Effect on the answer of restoring each component" in (
        tmp_path / "site" / "reference" / "tracing" / "index.html").read_text()  # the API reference is rendered
