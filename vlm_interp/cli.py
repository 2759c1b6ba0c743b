"""The ``vlm-interp`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "tiny:llava"


def _demo(args: argparse.Namespace) -> int:
    """Render a shapes scene, ask the model about one object, show where that object's tokens are."""
    import torch

    import vlm_interp as vi
    from vlm_interp.plots import save_object_overlay
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load(args.model)
    scene = World().scene(args.seed)
    target = scene.objects[0]
    question = existence_question(target.shape)
    ex = vlm.prepare(scene.pil(), question, answer="yes", region=target.mask)
    print(vlm.adapter.describe())
    print(f"\nscene (seed {args.seed}): " + ", ".join(f"{o.color} {o.shape}" for o in scene.objects))
    print(f"question: {question}")
    lm = ex.groups["lm"]
    print(f"LM sequence: {ex.n_tokens} tokens; image tokens {len(lm.get('image', []))}, "
          f"question tokens {len(lm['question'])}, '{target.shape}' object tokens {lm.get('object', [])}")
    for answer in ("yes", "no"):
        s = vlm.score(ex, answer)
        print(f"P({answer}) = {s.prob:.4f}   log P = {s.logprob:.3f}")
    print(f"generated: {vlm.generate(ex, max_new_tokens=5)!r}")
    # Effect of zeroing the object's image tokens at the LM input, per LM layer output (a first look;
    # the tracing engine does this properly, batched and with corruptions).
    positions = lm.get("object", [])
    if positions:
        base = vlm.score(ex).logprob

        def zero(t):
            t = t.clone()
            t[:, positions] = 0
            return t

        for layer in range(vlm.adapter.n_layers["lm"]):
            with vlm.hooks([vlm.hook(f"lm.hidden.{layer}", zero)]), torch.no_grad():
                moved = vlm.score(ex).logprob - base
            print(f"zero object tokens after lm layer {layer}: change in log P(yes) = {moved:+.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_object_overlay(ex, "vision", out / "object_patches.png", title=question)
    print(f"\nwrote {path}")
    return 0


def _sites(args: argparse.Namespace) -> int:
    import vlm_interp as vi

    vlm = vi.load(args.model)
    print(vlm.adapter.describe())
    for tower in vlm.adapter.towers():
        for component in vlm.adapter.components(tower):
            sites = vlm.adapter.sites(tower, component)
            print(f"{tower}.{component}: {len(sites)} sites, e.g. {sites[0].name} .. {sites[-1].name}")
    return 0


def _families(args: argparse.Namespace) -> int:
    from vlm_interp.adapters import supported

    print("\n".join(supported()))
    return 0


def _zoo_list(args: argparse.Namespace) -> int:
    from vlm_interp.zoo import card, list_organisms

    for name in list_organisms():
        c = card(name)
        if not c.get("trained"):
            print(f"{name:22s} {c['recipe']['family']:13s} not trained yet (vlm-interp zoo train {name})")
            continue
        m = c["metrics"]
        print(f"{name:22s} {c['family']:13s} {c['parameters'] / 1e6:.2f} M params; POPE random acc "
              f"{m['pope']['random']['accuracy']:.3f}, adversarial acc {m['pope']['adversarial']['accuracy']:.3f}, "
              f"colour {m['attribute']['accuracy']:.3f}, relation {m['relation']['accuracy']:.3f}, "
              f"prior excess {m['pope']['prior_excess_points']:+.1f} pts")
        if args.cards:
            from vlm_interp.zoo import ORGANISM_DIR

            print((ORGANISM_DIR / name / "README.md").read_text())
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    from vlm_interp.zoo.train import retrain

    card = retrain(args.name, Path(args.out or args.name), seed=args.seed, vqa_steps=args.steps,
                   vision_steps=args.vision_steps, train_scenes=args.scenes, evaluate_after=not args.no_eval)
    print(f"wrote {args.out or args.name}")
    if card:
        from vlm_interp.zoo.cards import card_markdown

        print(card_markdown(card))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-interp",
        description="Causal interpretability for vision-language models: trace, intervene, compare hallucination.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on an embedded default model: ask about a rendered scene")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    demo.add_argument("--seed", type=int, default=3, help="seed of the rendered shapes scene")
    demo.add_argument("--out", default="vlm-interp-demo", help="folder for the pictures")
    demo.set_defaults(run=_demo)
    sites = sub.add_parser("sites", help="list the towers, components and sites of a model")
    sites.add_argument("--model", default=DEFAULT_MODEL)
    sites.set_defaults(run=_sites)
    zoo = sub.add_parser("zoo", help="the model organisms: list them, retrain one")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zl = zoo_sub.add_parser("list", help="the organisms with their headline numbers")
    zl.add_argument("--cards", action="store_true", help="also print each model card")
    zl.set_defaults(run=_zoo_list)
    zt = zoo_sub.add_parser("train", help="retrain an organism from its recipe (about 20 minutes on 2 cores)")
    zt.add_argument("name", help="organism name, e.g. shapes-llava")
    zt.add_argument("--out", help="output folder (default: ./NAME)")
    zt.add_argument("--seed", type=int, help="override the recipe's seed")
    zt.add_argument("--steps", type=int, help="override the number of question-answering steps")
    zt.add_argument("--vision-steps", type=int, help="override the number of vision pretraining steps")
    zt.add_argument("--scenes", type=int, help="override the number of training scenes")
    zt.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and the card")
    zt.set_defaults(run=_zoo_train)
    fams = sub.add_parser("families", help="list the supported model classes")
    fams.set_defaults(run=_families)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the command's output to what it says itself
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
