"""vlm-interp zoo: list and retrain the model organisms."""

from __future__ import annotations

import argparse
from pathlib import Path



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
    from vlm_interp.zoo import card as zoo_card
    from vlm_interp.zoo.train import retrain

    threads = args.threads
    if threads is None:
        threads = zoo_card(args.name).get("environment", {}).get("threads")  # repeat the shipped run
        if threads is not None:
            print(f"training on {threads} CPU thread(s), as the shipped {args.name} was (--threads to change)")
    card = retrain(args.name, Path(args.out or args.name), seed=args.seed, vqa_steps=args.steps,
                   vision_steps=args.vision_steps, train_scenes=args.scenes, evaluate_after=not args.no_eval,
                   threads=threads)
    print(f"wrote {args.out or args.name}")
    if card:
        from vlm_interp.zoo.cards import card_markdown

        print(card_markdown(card))
    return 0


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    zoo = sub.add_parser("zoo", help="the model organisms: list them, retrain one")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zl = zoo_sub.add_parser("list", help="the organisms with their headline numbers")
    zl.add_argument("--cards", action="store_true", help="also print each model card")
    zl.set_defaults(run=_zoo_list)
    zt = zoo_sub.add_parser("train", help="retrain an organism from its recipe (shapes-llava: about 25 minutes "
                            "on the one thread the shipped ones used, about 19 with --threads 2)")
    zt.add_argument("name", help="organism name, e.g. shapes-llava")
    zt.add_argument("--out", help="output folder (default: ./NAME)")
    zt.add_argument("--seed", type=int, help="override the recipe's seed")
    zt.add_argument("--steps", type=int, help="override the number of question-answering steps")
    zt.add_argument("--vision-steps", type=int, help="override the number of vision pretraining steps")
    zt.add_argument("--scenes", type=int, help="override the number of training scenes")
    zt.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and the card")
    zt.add_argument("--threads", type=int,
                    help="torch CPU threads (default: as many as the shipped checkpoint was trained with, which "
                         "repeats it; another count gives a different run of the same recipe)")
    zt.set_defaults(run=_zoo_train)
