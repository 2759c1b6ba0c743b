"""Batched evaluation: padded batches give the answers of one-at-a-time runs, for every family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import vlm_interp as vi
from vlm_interp import batching
from vlm_interp.batching import BatchError
from vlm_interp.corruptions import noise

@pytest.fixture(scope="module")
def pope_folder(tmp_path_factory):
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    folder = tmp_path_factory.mktemp("pope")
    write_pope(World(ORGANISM_WORLD), folder, n_images=4, seed=3, per_image=2)
    return folder


@pytest.fixture(scope="module")
def tiny_llava():
    return vi.load("tiny:llava")


QUESTIONS = ["Is there a red circle ?", "Is there a star ?", "What color is the square in the image ?",
             "Is there a blue cross left of the star ?", "Is there a star ?"]


def _images() -> list[Image.Image]:
    """Five random images; two of other shapes, which LLaVA-NeXT cuts into other numbers of tiles and tokens."""
    rng = np.random.default_rng(3)
    sizes = [(32, 32), (48, 32), (32, 32), (40, 56), (32, 32)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def test_batched_answers_equal_one_at_a_time(vlm):
    """First-token logits and greedy generations of padded batches against single runs of the same examples."""
    examples = [vlm.prepare(im, q) for im, q in zip(_images(), QUESTIONS)]
    single_logits = torch.stack([vlm.first_token_logits(ex) for ex in examples])
    single_texts = [vlm.generate(ex, max_new_tokens=6) for ex in examples]
    logits = torch.empty_like(single_logits)
    texts = [None] * len(examples)
    plan = batching.plan(vlm, examples, batch_size=4)
    assert sorted(i for b in plan for i in b) == list(range(len(examples))) and max(map(len, plan)) <= 4
    for index in plan:
        batch = batching.collate(vlm, [examples[i] for i in index])
        logits[index] = batching.first_token_logits(vlm, batch)
        for i, text in zip(index, batching.generate(vlm, batch, max_new_tokens=6)):
            texts[i] = text
    assert texts == single_texts
    assert torch.equal(logits.argmax(-1), single_logits.argmax(-1))
    torch.testing.assert_close(logits, single_logits, atol=1e-5, rtol=1e-5)
    if vlm.adapter.adapter.padding:  # families that pad join questions of different lengths in one batch
        assert len(plan) == 2


def test_left_padding_shifts_the_answer_position(vlm):
    """A decoder LM's prompt is padded on the left: the answer is read at the last position of every row."""
    examples = [vlm.prepare(im, q) for im, q in zip(_images()[:2], QUESTIONS[:2])]
    if not vlm.adapter.adapter.padding:
        with pytest.raises(BatchError, match="does not pad"):
            batching.collate(vlm, examples)
        return
    batch = batching.collate(vlm, examples)
    lengths = [ex.inputs["input_ids"].shape[1] for ex in examples]
    width = batch.inputs["input_ids"].shape[1]
    assert width == max(lengths) and batch.shift["lm"] == [width - n for n in lengths]
    assert batching.answer_positions(vlm, batch) == [width - 1, width - 1]
    mask = batch.inputs["attention_mask"]
    assert [int(m.sum()) for m in mask] == lengths and mask[:, -1].all()


def test_examples_with_in_model_edits_are_refused(vlm):
    ex = vlm.prepare(_images()[0], QUESTIONS[0], answer="yes")
    noisy = noise(vlm, ex, scale="3sd", tokens="image", seed=0)
    with pytest.raises(BatchError, match="in-model edits"):
        batching.collate(vlm, [ex, noisy])


def test_batch_size_must_be_positive(vlm):
    with pytest.raises(ValueError, match="positive integer"):
        batching.plan(vlm, [], batch_size=0)


def test_batched_pope_and_chair_equal_one_at_a_time(tmp_path, pope_folder, tiny_llava):
    from vlm_interp.hallucination.chair import run_chair
    from vlm_interp.hallucination.compare import read_pope_folder
    from vlm_interp.hallucination.pope import load_results, run_pope

    items = read_pope_folder(pope_folder)
    one = run_pope(tiny_llava, items, pope_folder / "images", tmp_path / "one.jsonl", progress=False)
    many = run_pope(tiny_llava, items, pope_folder / "images", tmp_path / "many.jsonl", progress=False, batch_size=3)
    key = ["split", "question_id"]
    a = load_results(one).sort_values(key).reset_index(drop=True)
    b = load_results(many).sort_values(key).reset_index(drop=True)
    exact = [c for c in a.columns if c not in ("p_yes", "p_no")]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    np.testing.assert_allclose(a[["p_yes", "p_no"]].to_numpy(), b[["p_yes", "p_no"]].to_numpy(), rtol=1e-5,
                               atol=1e-7)
    captions = pope_folder / "captions.jsonl"
    single, _ = run_chair(tiny_llava, captions, pope_folder / "images", max_new_tokens=6, progress=False)
    batched, _ = run_chair(tiny_llava, captions, pope_folder / "images", max_new_tokens=6, progress=False,
                           batch_size=4)
    assert single["caption"].tolist() == batched["caption"].tolist()
