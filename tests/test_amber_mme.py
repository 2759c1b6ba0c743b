"""AMBER and MME: readers on files written from the documented layouts, metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from vlm_interp.hallucination.amber import (AmberFormatError, AmberVocabulary, amber_binary,
                                            amber_generative_metrics, amber_generative_scores, read_amber,
                                            read_amber_folder)
from vlm_interp.hallucination.mme import MmeFormatError, mme_metrics, parse_mme, read_mme


def _amber_folder(tmp_path, queries=None, annotations=None):
    """A folder in AMBER's data layout: two images, one caption query each, four discriminative questions."""
    (tmp_path / "query").mkdir()
    (tmp_path / "image").mkdir()
    for name in ("AMBER_1.jpg", "AMBER_2.jpg"):
        (tmp_path / "image" / name).write_bytes(b"")
    queries = queries or [
        {"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
        {"id": 2, "image": "AMBER_2.jpg", "query": "Describe this image."},
        {"id": 3, "image": "AMBER_1.jpg", "query": "Is there a cloud in this image?"},
        {"id": 4, "image": "AMBER_1.jpg", "query": "Is the sky sunny in this image?"},
        {"id": 5, "image": "AMBER_2.jpg", "query": "Is the dog on the grass?"},
        {"id": 6, "image": "AMBER_2.jpg", "query": "Is the grass wet in this image?"},
    ]
    annotations = annotations or [
        {"id": 1, "type": "generative", "truth": ["sky", "grass", "person"], "hallu": ["cloud", "dog"]},
        {"id": 2, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat"]},
        {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "yes"},
        {"id": 5, "type": "discriminative-relation", "truth": "yes"},
        {"id": 6, "type": "discriminative-attribute-state", "truth": "no"},
    ]
    # AMBER's files are indented JSON arrays, one key per line
    (tmp_path / "query" / "query_all.json").write_text(json.dumps(queries, indent=4))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations, indent=4))
    relation = {"sky": [], "grass": ["ground"], "person": ["people", "man", "woman"], "cloud": [], "dog": ["puppy"],
                "cat": ["kitten"], "tree": []}
    (tmp_path / "relation.json").write_text(json.dumps(relation, indent=4))
    (tmp_path / "safe_words.txt").write_text("tree\n")
    return tmp_path


def test_amber_reader_joins_queries_and_annotations(tmp_path):
    items, vocab = read_amber_folder(_amber_folder(tmp_path))
    assert [i.dimension for i in items] == ["generative", "generative", "existence", "attribute", "relation",
                                            "attribute"]
    assert items[0].truth == ("sky", "grass", "person") and items[0].hallu == ("cloud", "dog")
    assert items[2].truth == "no" and items[2].image == "AMBER_1.jpg"
    only = read_amber(tmp_path / "query" / "query_all.json", tmp_path / "annotations.json", dimensions=["attribute"])
    assert [i.id for i in only] == [4, 6]
    assert vocab.mentions("A man and two dogs under a tree near the ground.") == ["man", "dog", "ground"]


@pytest.mark.parametrize("bad, message", [
    ({"queries": [{"id": 1, "image": "AMBER_1.jpg"}]}, r"query_all.json:2: not an AMBER query"),
    ({"queries": [{"id": 9, "image": "AMBER_1.jpg", "query": "q"}]}, r"query_all.json:2: query 9 has no annotation"),
    ({"queries": [{"id": 1, "image": "AMBER_7.jpg", "query": "q"}]}, r"image 'AMBER_7.jpg' not found"),
    ({"annotations": [{"id": 1, "type": "generative", "truth": ["sky"]},
                      {"id": 2, "type": "discriminative-hallucination", "truth": "maybe"}]},
     r"annotations.json:9: truth 'maybe'"),
    ({"annotations": [{"id": 1, "type": "caption", "truth": []}]}, r"annotations.json:2: unknown type 'caption'"),
])
def test_amber_reader_errors_name_file_and_line(tmp_path, bad, message):
    folder = _amber_folder(tmp_path, **bad)
    with pytest.raises(AmberFormatError, match=message):
        read_amber_folder(folder)


def test_amber_reader_rejects_broken_json_by_line(tmp_path):
    folder = _amber_folder(tmp_path)
    (folder / "annotations.json").write_text('[\n  {"id": 1, "type": "generative", "truth": []},\n  {"id": 2,,}\n]')
    with pytest.raises(AmberFormatError, match=r"annotations.json:3: not valid JSON"):
        read_amber_folder(folder)


def test_amber_binary_counts_no_as_positive():
    gold = ["no", "no", "no", "yes", "yes"]
    pred = ["no", "no", "yes", "no", "yes"]
    m = amber_binary(pred, gold)
    # answered no: 3, of which right 2 -> precision 2/3; gold no: 3, found 2 -> recall 2/3
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["no_ratio"] == pytest.approx(3 / 5)
    # edge cases: never answering "no" gives precision, recall and F1 of 0; an empty input gives NaN
    never = amber_binary(["yes", "yes"], ["no", "yes"])
    assert (never["precision"], never["recall"], never["f1"], never["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    assert all(math.isnan(amber_binary([], [])[k]) for k in ("accuracy", "precision", "f1"))
    # an unparsable answer is not "yes": it counts as wrong on "yes" questions (AMBER compares strings)
    assert amber_binary(["maybe"], ["yes"])["accuracy"] == 0.0


def test_amber_generative_metrics_by_hand(tmp_path):
    items, vocab = read_amber_folder(_amber_folder(tmp_path), dimensions=["generative"])
    responses = [
        # mentions: man (person, safe), cloud (hallucinated, in hallu), dog (hallucinated, in hallu), tree (safe word)
        "A man stands under a cloud with a dog by a tree.",
        # mentions: puppy (dog, safe), ground (grass, safe), puppy again
        "A puppy on the ground. The puppy sleeps.",
    ]
    scores = amber_generative_scores(responses, items, vocab)
    assert scores["mentions"].tolist() == [["man", "cloud", "dog"], ["puppy", "ground", "puppy"]]
    assert scores["n_hallucinated"].tolist() == [2, 0]
    m = amber_generative_metrics(scores, n_boot=50)
    assert m["chair"] == pytest.approx(2 / 6)  # pooled mentions, duplicates counted
    assert m["cover"] == pytest.approx((1 + 2) / (3 + 2))  # person of sky/grass/person; dog and grass
    assert m["hal"] == pytest.approx(1 / 2)
    assert m["cog"] == pytest.approx(2 / 3)  # cloud and dog of [cloud, dog]; nothing of [cat]
    assert m["chair_lo"] <= m["chair"] <= m["chair_hi"]
    # no mention at all: CHAIR undefined (NaN), Hal 0
    empty = amber_generative_metrics(amber_generative_scores(["Nothing here.", ""], items, vocab), n_boot=10)
    assert math.isnan(empty["chair"]) and empty["hal"] == 0.0 and empty["cover"] == 0.0


def _mme_release(tmp_path):
    for subtask, rows in {
        "existence": {"a": [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                            ("Is there a cat in this image? Please answer yes or no.", "No")],
                      "b": [("Is there a car?", "No"), ("Is there a bus?", "Yes")]},
        "color": {"c": [("Is the car red?", "Yes"), ("Is the car blue?", "No")]},
    }.items():
        folder = tmp_path / subtask
        folder.mkdir(parents=True)
        for stem, qa in rows.items():
            (folder / f"{stem}.jpg").write_bytes(b"")
            (folder / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))
    return tmp_path


def test_mme_reader_both_layouts(tmp_path):
    release = _mme_release(tmp_path / "release")
    items = read_mme(release, ["existence", "color"])
    assert [(i.subtask, i.question_id, i.image, i.label) for i in items] == [
        ("existence", 1, "existence/a.jpg", "yes"), ("existence", 2, "existence/a.jpg", "no"),
        ("existence", 3, "existence/b.jpg", "no"), ("existence", 4, "existence/b.jpg", "yes"),
        ("color", 1, "color/c.jpg", "yes"), ("color", 2, "color/c.jpg", "no")]
    tool = tmp_path / "tool"
    (tool / "position" / "images").mkdir(parents=True)
    (tool / "position" / "images" / "p.png").write_bytes(b"")
    (tool / "position.txt").write_text("p.png\tIs the cup on the left?\tYes\np.png\tIs the cup on the right?\tNo\n")
    assert [(i.image, i.label) for i in read_mme(tool, ["position"])] == [("position/images/p.png", "yes"),
                                                                          ("position/images/p.png", "no")]


@pytest.mark.parametrize("text, message", [
    ("Is there a dog?\tMaybe\nIs there a cat?\tNo\n", r"a.txt:1: answer 'Maybe' must be Yes or No"),
    ("Is there a dog?\nIs there a cat?\tNo\n", r"a.txt:1: expected question and answer"),
    ("Is there a dog?\tYes\nIs there a cat?\tYes\n", r"a.txt:1: image existence/a.jpg has answers \['yes', 'yes'\]"),
])
def test_mme_reader_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "existence").mkdir()
    (tmp_path / "existence" / "a.jpg").write_bytes(b"")
    (tmp_path / "existence" / "a.txt").write_text(text)
    with pytest.raises(MmeFormatError, match=message):
        read_mme(tmp_path, ["existence"])
    with pytest.raises(MmeFormatError, match="no MME subtask 'count'"):
        read_mme(tmp_path, ["count"])


def test_mme_parse_rule():
    assert [parse_mme(t) for t in ("Yes", "no", "Yes, there is.", "No.", "There is a dog", "not sure", "")] == \
        ["yes", "no", "yes", "no", "other", "no", "other"]


def test_mme_metrics_by_hand():
    frame = pd.DataFrame({
        "subtask": ["existence"] * 6 + ["color"] * 2,
        "image": ["a", "a", "b", "b", "c", "c", "d", "d"],
        "label": ["yes", "no"] * 4,
        "parsed": ["yes", "no", "yes", "yes", "other", "no", "no", "yes"],
    })
    table = mme_metrics(frame, n_boot=50).set_index("subtask")
    # existence: right = a: 2, b: 1, c: 1 -> acc 4/6, acc+ 1/3, score 100 * (4/6 + 1/3) = 100
    assert table.loc["existence", "acc"] == pytest.approx(4 / 6)
    assert table.loc["existence", "acc_plus"] == pytest.approx(1 / 3)
    assert table.loc["existence", "score"] == pytest.approx(100.0)
    # colour: both wrong -> 0; total = 100 + 0
    assert table.loc["color", "score"] == 0.0 and table.loc["total", "score"] == pytest.approx(100.0)
    assert table.loc["existence", "acc_lo"] <= table.loc["existence", "acc"] <= table.loc["existence", "acc_hi"]
    with pytest.raises(MmeFormatError, match="exactly its two answers"):
        mme_metrics(frame.iloc[:-1], n_boot=10)


def test_built_in_sets_have_their_documented_layouts(tmp_path):
    import vlm_interp  # noqa: F401  (the package root registers the built-in sets)
    from vlm_interp.hallucination.sets import QUESTION_SETS
    from vlm_interp.zoo.shapes import SHAPES

    amber = QUESTION_SETS["zoo-amber"](tmp_path / "amber", 3)
    for name in ("query/query_all.json", "annotations.json", "relation.json", "safe_words.txt"):
        assert (amber / name).is_file()
    items, vocab = read_amber_folder(amber)
    assert [i.id for i in items] == list(range(1, len(items) + 1))
    assert [i.dimension for i in items[:3]] == ["generative"] * 3 and not any(i.generative for i in items[3:])
    assert all(i.truth == "no" for i in items if i.dimension == "existence")  # as AMBER's existence questions
    assert all(set(i.truth) <= set(SHAPES) and not set(i.truth) & set(i.hallu) for i in items[:3])
    assert {i.type for i in items if i.dimension == "relation"} <= {"discriminative-relation", "relation"}
    assert vocab.mentions("a disk and two boxes") == ["disk", "box"]
    mme = QUESTION_SETS["zoo-mme"](tmp_path / "mme", 3)
    questions = read_mme(mme, ["existence", "color", "position"])  # two per image, one Yes and one No (checked)
    assert all(q.text.endswith("?") for q in questions)  # as the organisms were trained (no MME suffix)
    assert not (mme / "count").exists()  # no organism is trained to count


def test_suite_tests_and_plot_by_hand(tmp_path):
    from vlm_interp.hallucination.suite import paired, plot_suite

    index = pd.MultiIndex.from_tuples([("random", k) for k in range(4)])
    a = {("pope", "logits", "all"): pd.Series([True, True, False, False], index=index)}
    b = {("pope", "logits", "all"): pd.Series([False, False, False, True], index=index)}
    tests = paired({"A": a, "B": b})
    assert tests[["only_a", "only_b", "n"]].values.tolist() == [[2, 1, 4]]
    assert tests["p_value"].iloc[0] == pytest.approx(1.0)  # 3 discordant pairs, 2 vs 1: two-sided binomial = 1
    table = pd.DataFrame([{"system": s, "benchmark": "pope", "split": "adversarial", "source": "logits",
                           "metric": "accuracy", "value": v, "lo": v - 0.1, "hi": v + 0.1, "n": 4}
                          for s, v in (("A", 0.5), ("B", 0.25))])
    assert plot_suite(table, tmp_path / "p.png").stat().st_size > 0
