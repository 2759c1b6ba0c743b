"""The command line and the README's promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    install, test = readme_commands()
    assert (ROOT / "README.md").read_text().index("```bash") < 20  # the very start of the README
    assert "vlm-interp demo" in install and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci
    # the extra steps after it: the floor of the declared transformers range, in a second environment
    assert ci.index(test) < ci.index("from vlm_interp.compat import TESTED; print(TESTED[0])") < ci.index(
        '"transformers==$floor"') < ci.index(".venv-floor/bin/python -m pytest")


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "vlm_interp.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("demo", "sites", "families"):
        assert command in out


def test_demo_runs_and_writes_its_picture(tmp_path):
    from vlm_interp.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    picture = tmp_path / "object_patches.png"
    assert picture.exists() and picture.stat().st_size > 1000


def test_sites_command_lists_every_component(capsys):
    from vlm_interp.cli import main

    assert main(["sites", "--model", "tiny:instructblip"]) == 0
    out = capsys.readouterr().out
    assert "qformer.xattn_head: 4 sites" in out and "lm.head: 8 sites" in out


@pytest.mark.parametrize("spec", ["noise", "noise:scale=3sd,tokens=object,seed=1", "str:circle=square",
                                  "edit:fill=mean", "pair:OTHER"])
def test_trace_command_accepts_every_corruption(tmp_path, spec):
    import json

    from vlm_interp.cli import main
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World

    other = tmp_path / "other.png"
    World(ORGANISM_WORLD).scene(99).pil().save(other)
    spec = spec.replace("OTHER", str(other))
    out = tmp_path / "trace"
    assert main(["trace", "--model", "tiny:llava", "--image", "shapes:3", "--question", "Is there a circle in the image?",
                 "--answer", "yes", "--corrupt", spec, "--tokens", "image,question,last", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corruption"] == spec and summary["answer"] == "yes"
    assert (out / "trace.png").stat().st_size > 1000
    from vlm_interp.tracing import Trace

    tr = Trace.load(out / "trace.json")
    assert tr.data.sizes["position"] == 3 and tr.attrs["corruption"] == spec


def test_trace_command_rejects_an_unknown_corruption(tmp_path):
    from vlm_interp.cli import main
    from vlm_interp.corruptions import CorruptionError

    with pytest.raises(CorruptionError):
        main(["trace", "--model", "tiny:llava", "--image", "shapes:3", "--question", "Is there a circle in the image?",
              "--answer", "yes", "--corrupt", "blur", "--out", str(tmp_path)])


def test_heads_score_then_pope_and_compare_with_interventions(tmp_path):
    import pandas as pd

    from vlm_interp.cli import main
    from vlm_interp.interventions import HeadScores
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    scores = tmp_path / "scores.nc"
    assert main(["heads", "score", "--model", "tiny:llava", "--n", "3", "--out", str(scores)]) == 0
    loaded = HeadScores.load(scores)
    assert loaded.data.sizes["example"] == 3 and (tmp_path / "scores.png").exists()
    questions = tmp_path / "pope"
    write_pope(World(ORGANISM_WORLD), questions, n_images=2, seed=3, per_image=1)
    plain, modulated = tmp_path / "plain", tmp_path / "modulated"
    for out, extra in ((plain, []), (modulated, ["--intervention", f"heads:{scores},lambda=2"])):
        assert main(["pope", "--model", "tiny:llava", "--questions", str(questions), "--splits", "random",
                     "--max-new-tokens", "2", "--out", str(out), *extra]) == 0
    a = pd.read_json(plain / "results.jsonl", lines=True)
    b = pd.read_json(modulated / "results.jsonl", lines=True)
    assert list(a.question_id) == list(b.question_id) and not (a.p_yes == b.p_yes).all()
    comp = tmp_path / "compare"
    assert main(["compare", "--models", "tiny:llava", "--questions", str(questions), "--splits", "random",
                 "--max-new-tokens", "2", "--out", str(comp), "--intervention", "vhr:alpha=2",
                 "--intervention", "damp=scale:lm.head.0.0=0"]) == 0
    table = pd.read_csv(comp / "table.csv")
    assert set(table.intervention) == {"none", "vhr:alpha=2", "damp"}


def test_unknown_intervention_is_a_clear_error(tmp_path):
    from vlm_interp.cli import main
    from vlm_interp.interventions import InterventionError

    with pytest.raises(InterventionError, match="unknown intervention"):
        main(["pope", "--model", "tiny:llava", "--intervention", "boost:x=1", "--images", "2", "--out", str(tmp_path)])
