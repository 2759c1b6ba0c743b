"""POPE questions per second, batched against one at a time, on the model organisms, in one run.

For each model: answer the same built-in shapes-world POPE questions (greedy generation and
first-token logits) one at a time and in batches of ``--batch-size``, time both, and check that
the answers are identical (generated text, parsed answer, logit answer) and that P(yes) and
P(no) agree to float rounding. Prints one line per model.

    python benchmarks/bench_eval.py                                  # the three organisms, 40 images
    python benchmarks/bench_eval.py --models zoo:shapes-llava --images 20 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import pandas as pd

import vlm_interp as vi
from vlm_interp.hallucination.compare import read_pope_folder
from vlm_interp.hallucination.pope import load_results, run_pope

MODELS = ("zoo:shapes-llava", "zoo:shapes-instructblip", "zoo:shapes-blip")


def pope_set(folder: Path, n_images: int) -> list:
    """The organisms' built-in POPE questions over ``n_images`` images (all three splits)."""
    from vlm_interp.hallucination.sets import question_folder

    return read_pope_folder(question_folder("zoo", folder, n_images=n_images))


def timed(vlm, items, images: Path, out: Path, batch_size: int, max_new_tokens: int) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    run_pope(vlm, items, images, out, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return seconds, load_results(out).sort_values(["split", "question_id"]).reset_index(drop=True)


def bench(model: str, items, images: Path, work: Path, batch_size: int, max_new_tokens: int, **load) -> dict:
    vlm = vi.load(model, **load)
    run_pope(vlm, items[:2], images, work / "warm.jsonl", max_new_tokens=max_new_tokens, progress=False)  # warm-up
    one_s, one = timed(vlm, items, images, work / "one.jsonl", 1, max_new_tokens)
    many_s, many = timed(vlm, items, images, work / "many.jsonl", batch_size, max_new_tokens)
    same = all((one[c] == many[c]).all() for c in ("answer_text", "parsed", "logit_answer"))
    p_diff = float(np.abs(one[["p_yes", "p_no"]].to_numpy() - many[["p_yes", "p_no"]].to_numpy()).max())
    n = len(items)
    return {"model": model, "questions": n, "one_at_a_time_qps": n / one_s, "batched_qps": n / many_s,
            "speedup": one_s / many_s, "identical_answers": same, "max_p_difference": p_diff}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--images", type=int, default=40, help="images of the built-in set (3 questions per image and "
                    "split)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--dtype", help="bf16, fp16, fp32 (default: the checkpoint's)")
    ap.add_argument("--device", help="e.g. cuda:0 (default cpu)")
    args = ap.parse_args(argv)
    load = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v is not None}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = pope_set(Path(tmp), args.images)
        for model in args.models:
            work = Path(tmp) / model.replace(":", "_")
            work.mkdir()
            row = bench(model, items, Path(tmp) / "pope_set" / "images", work, args.batch_size, args.max_new_tokens,
                        **load)
            rows.append(row)
            print(f"{model}: {row['questions']} questions, one at a time {row['one_at_a_time_qps']:.1f}/s, batches "
                  f"of {args.batch_size} {row['batched_qps']:.1f}/s, speed-up {row['speedup']:.2f}x, identical "
                  f"answers: {row['identical_answers']}, max |P difference| {row['max_p_difference']:.1e}",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
