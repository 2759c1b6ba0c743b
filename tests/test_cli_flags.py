"""Every command-line option does what it says: it reaches the code and changes the output, or it is refused
with a message that names it. Audited: demo, sites, families, zoo list, zoo train, trace, pope, chair, compare,
heads score, iri plan."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlm_interp.cli import main


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _usage_error(capsys, argv: list[str]) -> str:
    """Run a command that must stop at argument checking; return its error message."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


# ---- benchmark commands: pope, chair, compare ----------------------------------------------------------------


def test_compare_images_sizes_the_built_in_set(tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--models", "tiny:llava", "--images", "1", "--splits", "random", "--max-new-tokens", "1",
                 "--out", str(out)]) == 0
    asked = _rows(out / "pope_set" / "random.jsonl")
    answers = _rows(out / "tiny_llava" / "results.jsonl")
    assert len(_rows(out / "pope_set" / "captions.jsonl")) == 1 and len({r["image"] for r in asked}) == 1
    assert sorted(r["question_id"] for r in answers) == [r["question_id"] for r in asked]
    assert set(pd.read_csv(out / "table.csv")["n"]) == {len(asked)}


def test_built_in_set_is_rewritten_when_images_changes(tmp_path):
    from vlm_interp.zoo.questions import pope_folder

    folder = pope_folder(tmp_path / "set", n_images=2)
    two = _rows(folder / "random.jsonl")
    pope_folder(folder, n_images=1)  # a smaller set is the first image's questions, under the same ids
    assert _rows(folder / "random.jsonl") == [r for r in two if r["image"] == two[0]["image"]]
    assert len(_rows(folder / "captions.jsonl")) == 1
    kept = (folder / "random.jsonl").stat().st_mtime_ns
    pope_folder(folder, n_images=1)
    assert (folder / "random.jsonl").stat().st_mtime_ns == kept  # the same size is not written again


@pytest.mark.parametrize("command", [["pope"], ["chair"], ["compare", "--models", "tiny:llava"]])
def test_images_with_own_questions_is_a_usage_error(tmp_path, capsys, command):
    err = _usage_error(capsys, [*command, "--questions", str(tmp_path), "--images", "5", "--out", str(tmp_path)])
    assert "--images 5 sizes the built-in question set" in err and "--questions" in err


@pytest.mark.parametrize("option", [["--images", "0"], ["--max-new-tokens", "0"]])
def test_counts_below_one_are_usage_errors(tmp_path, capsys, option):
    err = _usage_error(capsys, ["pope", *option, "--out", str(tmp_path)])
    assert option[0] in err and "must be at least 1" in err


@pytest.mark.parametrize("option", [["--splits", "random"], ["--suffix", " Answer yes or no."]])
def test_chair_refuses_the_pope_only_options(tmp_path, capsys, option):
    assert f"unrecognized arguments: {' '.join(option)}" in _usage_error(capsys, ["chair", *option])


def test_chair_max_new_tokens_limit_and_images(tmp_path):
    out = tmp_path / "chair"
    assert main(["chair", "--model", "tiny:llava", "--images", "2", "--limit", "1", "--max-new-tokens", "2",
                 "--out", str(out)]) == 0
    assert len(_rows(out / "pope_set" / "captions.jsonl")) == 2  # --images
    captions = pd.read_csv(out / "chair_captions.csv")
    assert len(captions) == 1  # --limit
    assert captions["length"].max() == 2  # --max-new-tokens (32 before, whatever was asked)


def test_pope_resumed_with_other_settings_is_an_error_and_splits_are_honoured(tmp_path):
    from vlm_interp.hallucination.pope import PopeFormatError

    out = tmp_path / "pope"
    common = ["pope", "--images", "1", "--max-new-tokens", "1", "--out", str(out)]
    assert main([*common, "--model", "tiny:llava", "--splits", "random", "popular"]) == 0
    assert set(pd.read_csv(out / "table.csv")["split"]) == {"random", "popular"}
    assert main([*common, "--model", "tiny:llava", "--splits", "popular"]) == 0  # resumed: no question re-asked
    assert set(pd.read_csv(out / "table.csv")["split"]) == {"popular"}
    for changed, named in ((["--model", "tiny:blip"], "model='tiny:llava' (now 'tiny:blip')"),
                           (["--model", "tiny:llava", "--max-new-tokens", "2"], "max_new_tokens=1 (now 2)"),
                           (["--model", "tiny:llava", "--intervention", "scale:lm.head.0.0=0"],
                            "intervention='none' (now 'scale:lm.head.0.0=0')")):
        with pytest.raises(PopeFormatError, match=named.replace("(", r"\(").replace(")", r"\)")):
            main([*common, "--splits", "random", *changed])


def test_compare_resumed_with_a_changed_intervention_spec_is_an_error(tmp_path):
    from vlm_interp.hallucination.pope import PopeFormatError

    common = ["compare", "--models", "tiny:llava", "--images", "1", "--splits", "random", "--max-new-tokens", "1",
              "--out", str(tmp_path)]
    assert main([*common, "--intervention", "damp=scale:lm.head.0.0=0"]) == 0
    with pytest.raises(PopeFormatError, match="intervention='scale:lm.head.0.0=0' \\(now 'scale:lm.head.0.0=0.5'\\)"):
        main([*common, "--intervention", "damp=scale:lm.head.0.0=0.5"])


# ---- heads score, iri plan ---------------------------------------------------------------------------------


def test_heads_score_flags_reach_the_scores_and_a_changed_tower_is_an_error(tmp_path, capsys):
    from vlm_interp.interventions import HeadScores, InterventionError

    out = tmp_path / "scores.json"
    common = ["heads", "score", "--model", "tiny:llava", "--level", "attribute", "--n", "2", "--seed", "5",
              "--out", str(out)]
    assert main([*common, "--tower", "vision", "--ablation", "zero", "--top", "3"]) == 0
    scores = HeadScores.load(out)
    assert list(scores.data.coords["example"].values) == ["attribute-5-0", "attribute-5-1"]
    assert (scores.attrs["tower"], scores.attrs["ablation"], scores.attrs["level"]) == ("vision", "zero", "attribute")
    printed = capsys.readouterr().out
    assert printed.count("vision.head.") == 3  # --top
    with pytest.raises(InterventionError, match="tower='vision' \\(now 'lm'\\)"):
        main([*common, "--tower", "lm", "--ablation", "zero"])


def test_iri_plan_flags_reach_the_plan_and_a_changed_noise_is_an_error(tmp_path):
    """Traces one calibration question (needs the tracing fast path)."""
    from vlm_interp.errors import ResumeError
    from vlm_interp.interventions.iri import InjectionPlan

    out = tmp_path / "plan.json"
    common = ["iri", "plan", "--n", "1", "--seed", "7", "--out", str(out)]
    assert main([*common, "--k", "1", "--attn", "0.3", "--mlp", "0.2", "--noise", "5sd"]) == 0
    plan = InjectionPlan.load(out)
    assert plan.notes["noise"] == "5sd" and plan.notes["k"] == 1
    assert set(plan.coefficients.items()) <= {("attn", 0.3), ("mlp", 0.2)}
    assert all(len(sources) == 1 for targets in plan.targets.values() for sources in targets.values())
    assert [p.name for p in (tmp_path / "plan.parts").glob("object-7-*.json")]
    with pytest.raises(ResumeError, match="noise='5sd' \\(now '3sd'\\)"):
        main([*common, "--noise", "3sd"])


def test_resumable_folders_record_their_settings(tmp_path):
    from vlm_interp.errors import ResumeError
    from vlm_interp.files import check_settings

    folder = tmp_path / "parts"
    check_settings(folder, {"model": "a", "noise": "3sd"})
    check_settings(folder, {"model": "a", "noise": "3sd"})  # the same settings resume
    with pytest.raises(ResumeError, match="noise='3sd' \\(now '5sd'\\); use another folder, or delete"):
        check_settings(folder, {"model": "a", "noise": "5sd"})
    old = tmp_path / "old"
    old.mkdir()
    (old / "key.json").write_text("{}")
    with pytest.raises(ResumeError, match="model='\\(not recorded\\)'"):
        check_settings(old, {"model": "a"})


# ---- trace, zoo, sites ------------------------------------------------------------------------------------


def test_trace_flags_reach_the_trace(tmp_path):
    """Every trace option reaches the trace; --path is tested with the fast path (tests/test_trace_fast.py)."""
    from vlm_interp.tracing import Trace
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World

    image = tmp_path / "scene.png"
    World(ORGANISM_WORLD).scene(3).pil().save(image)
    out = tmp_path / "trace"
    assert main(["trace", "--model", "tiny:llava", "--image", str(image), "--question", "Is there a circle?",
                 "--answer", "no", "--region", "0,0,16,16", "--tokens", "object,last", "--tower", "lm",
                 "--components", "attn,lm.mlp", "--window", "3", "--metric", "logprob", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["answer"], summary["metric"]) == ("no", "logprob") and summary["clean_score"] < 0
    tr = Trace.load(out / "trace.json")
    assert tr.attrs["window"] == 3 and list(tr.data.coords["group"].values) == ["object", "last"]
    assert set(tr.data.coords["component"].values) == {"attn", "mlp"}
    with pytest.raises(SystemExit):  # a component of another tower than --tower is a usage error
        main(["trace", "--model", "tiny:llava", "--image", str(image), "--question", "Is there a circle?",
              "--tower", "vision", "--components", "lm.hidden", "--out", str(out)])


def test_zoo_train_flags_reach_the_recipe(tmp_path, monkeypatch):
    import vlm_interp.zoo.train as train

    calls = []
    monkeypatch.setattr(train, "retrain", lambda name, out, **kw: calls.append((name, out, kw)) or {})
    assert main(["zoo", "train", "shapes-llava", "--out", str(tmp_path), "--seed", "3", "--steps", "5",
                 "--vision-steps", "6", "--scenes", "7", "--no-eval", "--threads", "2"]) == 0
    assert calls[-1] == ("shapes-llava", tmp_path, {"seed": 3, "vqa_steps": 5, "vision_steps": 6, "train_scenes": 7,
                                                   "evaluate_after": False, "threads": 2})
    assert main(["zoo", "train", "shapes-llava", "--out", str(tmp_path)]) == 0
    from vlm_interp.zoo import card

    assert calls[-1][2]["threads"] == card("shapes-llava")["environment"]["threads"]
    assert calls[-1][2]["evaluate_after"] and calls[-1][2]["seed"] is None


def test_zoo_list_cards_prints_each_card(capsys):
    from vlm_interp.zoo import ORGANISM_DIR, list_organisms

    assert main(["zoo", "list"]) == 0
    plain = capsys.readouterr().out
    assert main(["zoo", "list", "--cards"]) == 0
    with_cards = capsys.readouterr().out
    card = (ORGANISM_DIR / list_organisms()[0] / "README.md").read_text()
    assert card not in plain and card in with_cards


def test_sites_model_chooses_the_model(capsys):
    assert main(["sites", "--model", "tiny:llava"]) == 0
    out = capsys.readouterr().out
    assert "qformer" not in out and "vision.head: 8 sites" in out  # tiny:instructblip has a Q-Former
