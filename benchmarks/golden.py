"""Golden outputs: traces and answer scores of every tiny family and of zoo:shapes-llava, saved or compared.

A refactor that moves code without meaning to change numbers runs this before and after:

    python benchmarks/golden.py /tmp/golden-before.json          # save
    python benchmarks/golden.py --compare /tmp/golden-before.json # fresh run, compared bit for bit

For each model it traces every component kind of every tower (whole components together, head
components on their own; small token selections), through the general path and, for the LM, the
fast path too, with two corruptions: seeded noise on the image embeddings (an in-model edit) and a
second image. It also records ``vlm.score`` of the clean and the noised example, a logit difference
and a short greedy generation. ``--compare`` prints the largest absolute difference of every entry
and exits with status 1 when any entry differs (NaN equals NaN) or when entries are missing or new.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
from PIL import Image

import vlm_interp as vi
from vlm_interp.corruptions import noise
from vlm_interp.sites import HEAD_COMPONENTS
from vlm_interp.tiny import FAMILIES, tiny
from vlm_interp.tracing import trace

QUESTION = "Is there a red circle ?"
ORGANISM = "zoo:shapes-llava"


def test_image(seed: int) -> Image.Image:
    """The tests' random 32x32 image (tests/conftest.py)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


def token_selection(example, tower: str):
    """A small token axis: the image and last groups where the tower has them, else all positions at once."""
    names = [g for g in ("image", "last") if g in example.groups.get(tower, {})]
    return names or "all"


def component_sets(vlm, tower: str) -> list[list[str]]:
    """Whole components of a tower in one trace, each head component in its own."""
    comps = vlm.adapter.components(tower)
    whole = [c for c in comps if c not in HEAD_COMPONENTS]
    return ([whole] if whole else []) + [[c] for c in comps if c in HEAD_COMPONENTS]


def model_entries(name: str, vlm, image, other) -> dict[str, np.ndarray | str]:
    """Every golden value of one model, keyed by a readable name."""
    out: dict[str, np.ndarray | str] = {}
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corruptions = {"noise": noise(vlm, clean, seed=0), "pair": vlm.prepare(other, QUESTION, answer="yes")}
    for label, ex in (("clean", clean), ("noise", corruptions["noise"]), ("pair", corruptions["pair"])):
        for answer in ("yes", "no"):
            s = vlm.score(ex, answer)
            out[f"{name}/score/{label}/{answer}"] = np.array([s.first_logprob, s.first_prob, s.logprob, s.prob])
        out[f"{name}/logit_diff/{label}"] = np.array([vlm.logit_diff(ex, "yes", "no")])
        out[f"{name}/first_token_logits/{label}"] = vlm.first_token_logits(ex).numpy().astype(np.float64)
    out[f"{name}/generate/noise"] = vlm.generate(corruptions["noise"], max_new_tokens=3)
    for tower in vlm.adapter.towers():
        tokens = token_selection(clean, tower)
        paths = ("general", "fast") if tower == "lm" else ("general",)
        for comps in component_sets(vlm, tower):
            for corruption, bad in corruptions.items():
                for path in paths:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # a fast path that declines falls back with a warning
                        tr = trace(vlm, clean, bad, components=[f"{tower}.{c}" for c in comps], tokens=tokens,
                                   progress=False, batch_size=16,
                                   fast_path="auto" if path == "fast" else False)
                    key = f"{name}/trace/{tower}.{'+'.join(comps)}/{corruption}/{path}"
                    out[key] = np.asarray(tr.data.values, dtype=np.float64)
                    out[key + "/scores"] = np.array([tr.attrs["clean_score"], tr.attrs["corrupt_score"]])
    return out


def collect() -> dict[str, np.ndarray | str]:
    image, other = test_image(0), test_image(1)
    out: dict[str, np.ndarray | str] = {}
    for family in FAMILIES:
        start = time.perf_counter()
        out.update(model_entries(family, vi.wrap(*tiny(family, seed=0)), image, other))
        print(f"{family}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World

    start = time.perf_counter()
    scene = World(ORGANISM_WORLD).scene(0)
    vlm = vi.load(ORGANISM)
    size = scene.pil().size
    other_scene = next(s for s in (World(ORGANISM_WORLD).scene(k) for k in range(1, 50)) if s.pil().size == size)
    out.update(model_entries(ORGANISM, vlm, scene.pil(), other_scene.pil()))
    print(f"{ORGANISM}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return out


def to_json(values: dict[str, np.ndarray | str]) -> dict:
    """Arrays as shape plus flat float64 values (Python's float repr round-trips exactly; NaN kept)."""
    return {k: v if isinstance(v, str) else {"shape": list(v.shape), "values": [float(x) for x in v.ravel()]}
            for k, v in values.items()}


def from_json(data: dict) -> dict[str, np.ndarray | str]:
    return {k: v if isinstance(v, str) else np.array(v["values"], dtype=np.float64).reshape(v["shape"])
            for k, v in data.items()}


def compare(before: dict[str, np.ndarray | str], now: dict[str, np.ndarray | str]) -> bool:
    """Print every entry's largest absolute difference; True when all are bit-for-bit equal."""
    same = True
    for key in sorted(set(before) | set(now)):
        if key not in now or key not in before:
            print(f"{key}: only in the {'saved' if key in before else 'fresh'} run")
            same = False
            continue
        a, b = before[key], now[key]
        if isinstance(a, str) or isinstance(b, str):
            equal = a == b
            print(f"{key}: {'equal' if equal else f'{a!r} != {b!r}'}")
        elif a.shape != b.shape:
            equal = False
            print(f"{key}: shape {a.shape} != {b.shape}")
        else:
            equal = bool(np.array_equal(a, b, equal_nan=True))
            diff = np.abs(a - b)
            finite = diff[~np.isnan(diff)]
            worst = float(finite.max()) if finite.size else 0.0
            nan_mismatch = bool((np.isnan(a) != np.isnan(b)).any())
            print(f"{key}: max abs diff {worst:.3g}{' (NaN pattern differs)' if nan_mismatch else ''}")
        same &= equal
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="JSON file to write the golden values to")
    parser.add_argument("--compare", metavar="FILE", help="compare a fresh run with a saved JSON file")
    args = parser.parse_args(argv)
    if bool(args.file) == bool(args.compare):
        parser.error("give either an output FILE or --compare FILE")
    start = time.perf_counter()
    now = collect()
    print(f"{len(now)} entries in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.file:
        Path(args.file).write_text(json.dumps(to_json(now)))
        print(f"wrote {args.file}", file=sys.stderr)
        return 0
    before = from_json(json.loads(Path(args.compare).read_text()))
    if compare(before, now):
        print(f"all {len(now)} entries are bit-for-bit equal")
        return 0
    print("DIFFERENCES found (see above)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
