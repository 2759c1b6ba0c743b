"""Run folders: the manifest (``run.json``) every result-writing command leaves, and the report of a folder.

``run.json`` says what ran (command, model and checkpoint hash, inputs, corruption, settings, versions)
and which files belong to the run. Each entry of ``results`` names a file and its ``kind``; the report
draws every result by its kind (``trace``, ``comparison``) or, for any other labelled result (logit lens,
knockout, attention maps, dataset means), by its dimensions. A command adds a kind of result by listing
its file here; nothing else needs to know it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path
from typing import Sequence

from .errors import VLMInterpError
from .files import atomic_write

MANIFEST = "run.json"
EXAMPLE = "example.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class RunFolderError(VLMInterpError):
    """A run folder without a readable manifest, or whose manifest lists files that are not there."""


def versions() -> dict:
    import importlib.metadata as metadata

    out = {"python": platform.python_version()}
    for package in ("vlm-interp", "torch", "transformers", "plotly"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def checkpoint(vlm) -> dict:
    """What the weights were: the hub commit when transformers recorded one, else a SHA-256 over the weight files
    of a local folder; tiny random models say so."""
    config = vlm.model.config
    source = getattr(config, "_name_or_path", "") or ""
    if vlm.name.startswith("tiny:"):
        return {"source": vlm.name, "hash": None, "note": "tiny random weights built in code"}
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return {"source": source, "hash": f"git:{commit}"}
    folder = Path(source)
    weights = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if not weights:
        return {"source": source, "hash": None, "note": "no weight files found to hash"}
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"source": source, "hash": f"sha256:{digest.hexdigest()}", "files": [p.name for p in weights]}


def save_example(example, folder: "str | Path") -> Path:
    """The parts of an example a report needs without the model: its image, tokens, groups and patch boxes."""
    folder = Path(folder)
    with_image = example.image is not None
    if with_image:
        import io

        buffer = io.BytesIO()
        example.image.convert("RGB").save(buffer, format="PNG")
        atomic_write(folder / "image.png", buffer.getvalue())
    record = {"question": example.question, "answer": example.answer, "tokens": list(example.tokens),
              "image": "image.png" if with_image else None,
              "groups": {t: {g: [int(p) for p in ps] for g, ps in gs.items()} for t, gs in example.groups.items()},
              "boxes": {t: [[int(p), *map(float, b)] for p, b in bs.items()] for t, bs in example.boxes.items()}}
    return atomic_write(folder / EXAMPLE, json.dumps(record))


def write_manifest(folder: "str | Path", command: str, results: Sequence[dict], vlm=None, inputs: dict | None = None,
                   corruption=None, settings: dict | None = None, files: Sequence["str | Path"] = ()) -> Path:
    """Write ``folder/run.json``: ``results`` are ``{"file": NAME, "kind": KIND[, "title": ...]}`` entries (extra
    files of a kind, such as a comparison's tests, under ``"files"``); ``files`` the other files the run wrote.
    Every listed file must exist (a missing one is an error here, not a broken report later)."""
    folder = Path(folder)
    entries = [dict(r) for r in results]
    names = [e["file"] for e in entries] + [f for e in entries for f in e.get("files", {}).values()]
    for f in map(Path, files):  # paths inside the folder, or names relative to it
        try:
            names.append(str(f.relative_to(folder)))
        except ValueError:
            names.append(str(f))
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise RunFolderError(f"the manifest of {folder} would list files that are not there: {missing}")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = {"command": command, "created": now,
                "model": None if vlm is None else {"name": vlm.name, "family": vlm.family, **checkpoint(vlm)},
                "inputs": inputs or {}, "corruption": corruption, "settings": settings or {}, "versions": versions(),
                "results": entries, "files": sorted(dict.fromkeys(names))}
    return atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1, default=str))


def read_manifest(folder: "str | Path") -> dict:
    """The manifest of a run folder; every file it lists must exist."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise RunFolderError(f"{folder} has no {MANIFEST}: it was not written by a vlm-interp command that records its "
                             "runs (demo, trace, trace-dataset, lens, knockout, attention, compare); rerun the command "
                             "into this folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err})") from None
    missing = [n for n in manifest.get("files", []) if not (folder / n).exists()]
    if missing:
        raise RunFolderError(f"{path} lists files that are not in {folder}: {missing}; the folder is incomplete")
    return manifest


class SavedExample:
    """An example as :func:`save_example` wrote it: image, tokens, groups and boxes (positions as ints)."""

    def __init__(self, folder: Path):
        record = json.loads((folder / EXAMPLE).read_text(encoding="utf-8"))
        self.question, self.answer, self.tokens = record["question"], record["answer"], record["tokens"]
        self.groups = record["groups"]
        self.boxes = {t: {int(row[0]): tuple(row[1:]) for row in rows} for t, rows in record["boxes"].items()}
        self.image = None
        if record.get("image"):
            from PIL import Image

            with Image.open(folder / record["image"]) as image:
                self.image = image.convert("RGB")


def _run_facts(manifest: dict) -> str:
    from .report import facts

    model = manifest.get("model") or {}
    items = {"command": manifest.get("command"), "created": manifest.get("created"), "model": model.get("name"),
             "checkpoint": model.get("hash") or model.get("note"),
             **{f"input: {k}": v for k, v in (manifest.get("inputs") or {}).items()},
             **{f"setting: {k}": v for k, v in (manifest.get("settings") or {}).items()},
             "versions": ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())}
    return facts(items)


def report_run(folder: "str | Path", path: "str | Path | None" = None) -> Path:
    """Write the report of a run folder (default ``folder/report.html``) from its manifest; returns its path."""
    import pandas as pd

    from .report import Page, Section, comparison_sections, labelled_sections, trace_sections
    from .tracing.results import Labelled, Trace

    folder = Path(folder)
    manifest = read_manifest(folder)
    example = SavedExample(folder) if (folder / EXAMPLE).exists() else None
    image, boxes = (example.image, example.boxes) if example else (None, None)
    page = Page(f"vlm-interp {manifest.get('command', 'run')}: {folder.name}")
    page.add(Section("Run").add(_run_facts(manifest)))
    if not manifest.get("results"):
        raise RunFolderError(f"{folder / MANIFEST} lists no results to report")
    for entry in manifest["results"]:
        kind, file = entry["kind"], folder / entry["file"]
        title = entry.get("title", f"{kind}: {entry['file']}")
        if kind == "trace":
            sections = trace_sections(Trace.load(file), image, boxes, title)
        elif kind == "comparison":
            tests = entry.get("files", {}).get("tests")
            try:
                test_rows = pd.read_csv(folder / tests).to_dict("records") if tests else []
            except pd.errors.EmptyDataError:  # one system: no pair to test
                test_rows = []
            sections = comparison_sections(pd.read_csv(file).to_dict("records"), test_rows, title)
        else:  # any other labelled result, drawn by its dimensions
            try:
                result = Labelled.load(file)
            except (ValueError, KeyError, OSError) as err:
                raise RunFolderError(f"{file} (kind {kind!r} in {folder / MANIFEST}) is not a labelled result the "
                                     f"report can read (saved by a result's .save(), JSON or NetCDF): {err!r}") \
                    from None
            sections = labelled_sections(result, title, image, boxes)
        for section in sections:
            page.add(section)
    return page.write(folder / "report.html" if path is None else path)
