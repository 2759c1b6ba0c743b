"""POPE, CHAIR and compare: metrics by hand, parsing, sharding, resuming, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

import vlm_interp as vi
from vlm_interp.hallucination import Vocabulary, binary_metrics, chair_metrics, chair_scores, mcnemar
from vlm_interp.hallucination.answers import parse_yes_no
from vlm_interp.hallucination.compare import compare, read_pope_folder
from vlm_interp.hallucination.pope import PopeFormatError, load_results, read_pope, run_pope
from vlm_interp.zoo.organisms import ORGANISM_WORLD
from vlm_interp.zoo.pope_set import write_pope
from vlm_interp.zoo.shapes import World


@pytest.fixture(scope="module")
def pope_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pope")
    write_pope(World(ORGANISM_WORLD), folder, n_images=4, seed=3, per_image=2)
    return folder


@pytest.fixture(scope="module")
def tiny_llava():
    return vi.load("tiny:llava")


def test_binary_metrics_edge_cases():
    m = binary_metrics(["yes", "no", "yes", "no"], ["yes", "yes", "no", "no"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    all_yes = binary_metrics(["yes"] * 3, ["yes", "no", "no"])
    assert all_yes["precision"] == pytest.approx(1 / 3) and all_yes["recall"] == 1.0 and all_yes["yes_ratio"] == 1.0
    assert all_yes["f1"] == pytest.approx(2 * (1 / 3) / (4 / 3))
    all_no = binary_metrics(["no"] * 3, ["yes", "no", "no"])
    assert all_no["precision"] == 0.0 and all_no["recall"] == 0.0 and all_no["f1"] == 0.0
    assert all_no["accuracy"] == pytest.approx(2 / 3)
    empty = binary_metrics([], [])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("accuracy", "precision", "recall", "yes_ratio"))
    with pytest.raises(ValueError, match="predictions"):
        binary_metrics(["yes"], [])


@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a star.", "yes"),
    ("No, there is not.", "no"),
    ("no", "no"),
    ("There is not a star in the image.", "no"),
    ("There is a star. No other shapes.", "yes"),  # only the first sentence counts
    ("Nope", "yes"),  # POPE's rule: not one of its negation words
    ("I do not know", "no"),
    ("", "yes"),
    ("No,", "no"),
    ("Notably, a star.", "yes"),
])
def test_pope_parsing_rule(text, parsed):
    assert parse_yes_no(text) == parsed


def test_mcnemar_by_hand():
    t = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 0, 1])
    assert (t["only_a"], t["only_b"]) == (3, 0) and t["p_value"] == pytest.approx(2 * 1 / 8)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0


def test_chair_with_synonyms_and_plurals():
    coco = Vocabulary.load("coco")
    assert coco.mentions("Two men ride bikes past a teddy bear and three hot dogs.") == \
        ["person", "bicycle", "teddy bear", "hot dog"]
    shapes = Vocabulary.load("shapes")
    scores = chair_scores(["a red disc and two blue boxes", "a star and a plus sign", "nothing here"],
                          [{"circle"}, {"star", "cross", "diamond"}, {"triangle"}], shapes)
    assert scores["mentions"].tolist() == [["circle", "square"], ["star", "cross"], []]
    m = chair_metrics(scores, n_boot=50)
    assert m["chair_i"] == pytest.approx(1 / 4)  # one hallucinated mention (square) of four
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["avg_length"] == pytest.approx((7 + 6 + 2) / 3)
    assert len(Vocabulary.load("coco").synonyms) == 80


def test_read_pope_errors_name_file_and_line(tmp_path, pope_folder):
    bad = tmp_path / "random.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "q", "label": "yes"}\n{"question_id": 2, "image"\n')
    with pytest.raises(PopeFormatError, match=r"random.jsonl:2"):
        read_pope(bad)
    bad.write_text('{"question_id": 1, "image": "missing.png", "text": "q", "label": "yes"}\n')
    with pytest.raises(PopeFormatError, match=r"random.jsonl:1: image 'missing.png' not found"):
        read_pope(bad, images=pope_folder / "images")
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "q", "label": "maybe"}\n')
    with pytest.raises(PopeFormatError, match="label 'maybe'"):
        read_pope(bad)
    with pytest.raises(PopeFormatError, match="unknown split 'weird'"):
        read_pope(pope_folder / "random.jsonl", split="weird")
    with pytest.raises(ValueError, match="unknown POPE split"):
        read_pope_folder(pope_folder, ["random", "hard"])


def test_resumed_run_equals_uninterrupted(tmp_path, pope_folder, tiny_llava):
    items = read_pope_folder(pope_folder)
    full = run_pope(tiny_llava, items, pope_folder / "images", tmp_path / "full.jsonl", progress=False)
    part = tmp_path / "part.jsonl"
    run_pope(tiny_llava, items[:5], pope_folder / "images", part, progress=False)
    with open(part, "a") as f:
        f.write('{"split": "random", "question_id": 99, "tor')  # an interrupted write
    with pytest.warns(UserWarning, match="interrupted last line"):
        run_pope(tiny_llava, items, pope_folder / "images", part, progress=False)
    a = load_results(full).sort_values(["split", "question_id"]).reset_index(drop=True)
    b = load_results(part).sort_values(["split", "question_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(PopeFormatError, match="suffix"):
        run_pope(tiny_llava, items, pope_folder / "images", part, suffix=" Please answer yes or no.", progress=False)


def test_missing_image_keeps_what_was_computed(tmp_path, pope_folder, tiny_llava):
    items = read_pope_folder(pope_folder)[:3]
    broken = items + [type(items[0])(999, "nowhere.png", "Is there a star in the image?", "yes", "random")]
    out = tmp_path / "r.jsonl"
    with pytest.raises(PopeFormatError, match="nowhere.png"):
        run_pope(tiny_llava, broken, pope_folder / "images", out, progress=False)
    assert len(load_results(out)) == 3


def test_compare_two_models_writes_table_plot_and_tests(tmp_path, pope_folder):
    result = compare(["tiny:llava", "tiny:blip"], questions=pope_folder, out=tmp_path, splits=["random", "adversarial"],
                     n_boot=50, progress=False)
    assert set(result.table["system"]) == {"tiny:llava", "tiny:blip"}
    assert len(result.table) == 2 * 2 * 2  # systems x splits x answer sources
    for name in ("table.csv", "table.md", "tests.csv", "compare.png"):
        assert (tmp_path / name).exists()
    assert set(result.tests["split"]) == {"random", "adversarial"} and (result.tests["p_value"] <= 1).all()
    llava = load_results(tmp_path / "tiny_llava" / "results.jsonl")
    row = result.table[(result.table.system == "tiny:llava") & (result.table.split == "random")
                       & (result.table.source == "logits")].iloc[0]
    random = llava[llava.split == "random"]
    assert row["accuracy"] == pytest.approx((random.logit_answer == random.label).mean())


def test_compare_with_an_intervention_resumes_without_rerunning(tmp_path, pope_folder):
    from vlm_interp.interventions import modulate_heads

    calls = []

    def damp(vlm):
        calls.append(vlm.name)
        return modulate_heads(vlm, {"lm.head.0.0": 0.0})

    first = compare(["tiny:llava"], questions=pope_folder, out=tmp_path, splits=["random"],
                    interventions={"damp": damp}, n_boot=20, progress=False)
    again = compare(["tiny:llava"], questions=pope_folder, out=tmp_path, splits=["random"],
                    interventions={"damp": damp}, n_boot=20, progress=False)
    assert calls == ["tiny:llava"]  # the finished system was not run (nor its intervention attached) again
    pd.testing.assert_frame_equal(first.table, again.table)


def test_markdown_table_formats_floats_and_escapes_pipes():
    """Hand-written expected table: floats to 3 decimals, a '|' inside a cell escaped so the row keeps its columns."""
    import pandas as pd

    from vlm_interp.hallucination.compare import markdown_table

    frame = pd.DataFrame({"probe": ["a |effect|", "b"], "mean": [0.12345, 1.0], "n": [3, 40]})
    assert markdown_table(frame) == ("| probe | mean | n |\n| --- | --- | --- |\n"
                                     "| a \\|effect\\| | 0.123 | 3 |\n| b | 1.000 | 40 |\n")
