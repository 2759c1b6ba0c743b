"""The ``vlm-interp`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "zoo:shapes-llava"
INTERVENTION_HELP = ("intervention during answering: heads:SCORES.nc,lambda=1 (V-SEAM head modulation), "
                     "vhr:alpha=2[,layers=1-3], iri:PLAN.json, scale:lm.head.2.1=1.5+lm.head.3.0=0")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (counts such as --images, --n, --limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _demo(args: argparse.Namespace) -> int:
    """Render a shapes scene, ask the model about one object, trace where the answer comes from."""
    import numpy as np

    import vlm_interp as vi
    from vlm_interp.corruptions import noise
    from vlm_interp.plots import save_object_overlay
    from vlm_interp.tracing import trace
    from vlm_interp.tracing.plot import plot_image_effects, plot_trace
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load(args.model)
    scene = World(ORGANISM_WORLD).scene(args.seed)
    target = scene.objects[0]
    question = existence_question(target.shape)
    ex = vlm.prepare(scene.pil(), question, answer="yes", region=target.mask)
    print(vlm.adapter.describe())
    print(f"\nscene (seed {args.seed}): " + ", ".join(f"{o.color} {o.shape}" for o in scene.objects))
    print(f"question: {question}   generated answer: {vlm.generate(ex, max_new_tokens=3)!r}")
    for answer in ("yes", "no"):
        print(f"  P({answer}) = {vlm.score(ex, answer).prob:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [save_object_overlay(ex, "vision", out / "object_patches.png", title=question)]
    # Causal tracing: noise (3 sd) on the vision tower's patch embeddings, then restore each LM site at each token:
    # the residual stream entering every layer (lm.input.0 is the LM's input embeddings), each layer's output, its
    # attention and its MLP. (Noise on the LM's image embeddings leaves shapes-llava's answer in place: its LM reads
    # a bounded scene code, and noise there does not look like an empty image.)
    corrupt = noise(vlm, ex, scale="3sd", tokens="image", place="patches", seed=0)
    tr = trace(vlm, ex, corrupt, components=["lm.input", "lm.hidden", "lm.attn", "lm.mlp"], tokens="each")
    print(f"\nP(yes) clean {tr.attrs['clean_score']:.4f}, patch embeddings noised {tr.attrs['corrupt_score']:.4f}")
    lm = ex.groups["lm"]
    if tr.total_effect > 0 and lm.get("object"):
        every = tr.rr().transpose("component", "layer", "position")
        rr = every.sel(component="input").values
        image_pos, objects = lm["image"], set(lm["object"])
        for layer in range(rr.shape[0]):
            values = rr[layer, image_pos]
            top = [image_pos[k] for k in np.argsort(-values)[:len(objects)]]
            hit = len(objects & set(top)) / len(objects)
            print(f"  entering lm layer {layer}: restoring single image tokens recovers up to {values.max():.2f} of "
                  f"the answer; {hit:.0%} of the strongest tokens lie on the {target.shape}")
        c, layer, position = np.unravel_index(int(np.nanargmax(every.values)), every.shape)
        print(f"  strongest single cell: lm.{every.coords['component'].values[c]} layer {layer} at position "
              f"{position} ({ex.tokens[position]!r}), recovers {float(every.values[c, layer, position]):.2f}")
        files.append(plot_image_effects(tr, ex, out / "image_effects.png"))
    files.append(plot_trace(tr, out / "trace.png"))
    tr.save(out / "trace.json")
    print("\nwrote " + ", ".join(str(f) for f in files) + f", {out / 'trace.json'}")
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


def _own_questions(args: argparse.Namespace) -> str | None:
    """The --questions folder, or None for the built-in set (no --questions, or --questions zoo)."""
    return None if args.questions in (None, "zoo") else args.questions


def _check_benchmark_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.images is not None and _own_questions(args) is not None:
        parser.error(f"--images {args.images} sizes the built-in question set, but --questions {args.questions} "
                     "gives the questions; drop --images (or --questions, to use the built-in set)")


def _check_trace_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    others = sorted({c.split(".")[0] for c in args.components.split(",") if "." in c} - {args.tower})
    if others:
        parser.error(f"--components names the tower(s) {others}, but --tower is {args.tower!r}; trace one tower at a "
                     f"time: give --tower {others[0]} or components without a tower prefix")


def _questions_folder(args: argparse.Namespace) -> Path:
    from vlm_interp.hallucination.compare import ZOO_POPE_IMAGES, zoo_pope_folder

    if _own_questions(args) is None:
        n_images = ZOO_POPE_IMAGES if args.images is None else args.images
        return zoo_pope_folder(Path(args.out) / "pope_set", n_images=n_images)
    return Path(args.questions)


def _pope(args: argparse.Namespace) -> int:
    import vlm_interp as vi
    from vlm_interp.files import atomic_write
    from vlm_interp.hallucination.compare import markdown_table, read_pope_folder
    from vlm_interp.hallucination.pope import pope_table, process_rank, run_pope_sharded

    folder = _questions_folder(args)
    items = read_pope_folder(folder, args.splits)
    vlm = vi.load(args.model)
    with _intervention(args, vlm):
        frame = run_pope_sharded(vlm, items, folder / "images", Path(args.out), suffix=args.suffix,
                                 max_new_tokens=args.max_new_tokens, intervention=args.intervention or "none")
    if process_rank()[0] == 0:
        table = pope_table(frame)
        atomic_write(Path(args.out) / "table.csv", table.to_csv(index=False))
        text = markdown_table(table[["split", "source", "accuracy", "accuracy_lo", "accuracy_hi", "precision",
                                     "recall", "f1", "yes_ratio", "not_explicit", "n"]])
        atomic_write(Path(args.out) / "table.md", text)
        print(text)
    return 0


def _chair(args: argparse.Namespace) -> int:
    import json

    import vlm_interp as vi
    from vlm_interp.hallucination.chair import run_chair
    from vlm_interp.files import atomic_write

    folder = _questions_folder(args)
    vlm = vi.load(args.model)
    with _intervention(args, vlm):
        scores, metrics = run_chair(vlm, folder / "captions.jsonl", folder / "images", vocab=args.vocab,
                                    prompt=args.prompt, max_new_tokens=args.max_new_tokens, limit=args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "chair_captions.csv", scores.to_csv(index=False))
    atomic_write(out / "chair.json", json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vlm_interp.hallucination.compare import compare, markdown_table

    result = compare(args.models, benchmark=args.benchmark, questions=_own_questions(args), out=args.out,
                     splits=args.splits, suffix=args.suffix, max_new_tokens=args.max_new_tokens,
                     interventions=_named_interventions(args.intervention), n_images=args.images)
    print(markdown_table(result.table[["system", "split", "source", "accuracy", "accuracy_lo", "accuracy_hi",
                                       "f1", "yes_ratio", "n"]]))
    if len(result.tests):
        print(markdown_table(result.tests, floatfmt=".4f"))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def _intervention(args: argparse.Namespace, vlm):
    """The context of ``--intervention SPEC`` for one model (a no-op context without it)."""
    import contextlib

    from vlm_interp.interventions import from_spec

    return from_spec(args.intervention)(vlm) if args.intervention else contextlib.nullcontext()


def _named_interventions(specs: list[str] | None) -> dict:
    """``NAME=SPEC`` or ``SPEC`` (named by itself) to {name: intervention}."""
    from vlm_interp.interventions import from_spec
    from vlm_interp.interventions.spec import KINDS

    out = {}
    for text in specs or []:
        name, sep, spec = text.partition("=")
        if not sep or name.split(":")[0] in KINDS:
            name, spec = text, text
        out[name] = from_spec(spec)
    return out


def _heads_score(args: argparse.Namespace) -> int:
    import vlm_interp as vi
    from vlm_interp.interventions import plot_head_scores, score_heads
    from vlm_interp.zoo.calibration import calibration_examples

    vlm = vi.load(args.model)
    out = Path(args.out)
    examples = calibration_examples(vlm, args.level, args.n, seed=args.seed)
    scores = score_heads(vlm, examples, tower=args.tower, component=args.component, ablation=args.ablation,
                         folder=out.with_suffix(".parts"), level=args.level)
    scores.save(out)
    plot_head_scores({args.level: scores}, out.with_suffix(".png"))
    right = int(scores.data.coords["correct"].values.sum())
    print(f"{scores.data.sizes['example']} {args.level} examples ({right} answered right), ablation {args.ablation}")
    print(scores.top(args.top).to_string(index=False))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _iri_plan(args: argparse.Namespace) -> int:
    import vlm_interp as vi
    from vlm_interp.corruptions import noise
    from vlm_interp.files import check_settings
    from vlm_interp.interventions import plan_from_recovery
    from vlm_interp.tracing.dataset import trace_dataset
    from vlm_interp.zoo.calibration import calibration_examples

    vlm = vi.load(args.model)
    out = Path(args.out)
    parts = out.with_suffix(".parts")  # one trace per question, kept for resuming (its key names --seed)
    check_settings(parts, {"model": vlm.name, "noise": args.noise}, fix="use another --out")
    examples = calibration_examples(vlm, "object", args.n, seed=args.seed, positive_only=True)
    pairs = [(key, lambda ex=ex: (ex, noise(vlm, ex, scale=args.noise, tokens="image", seed=0)))
             for key, ex in examples]
    result = trace_dataset(vlm, pairs, parts, components=("lm.attn", "lm.mlp"), tokens=("last",))
    summary = result.summary()
    rr = summary["mean"].isel(position=0, drop=True)
    plan = plan_from_recovery(rr, k=args.k, coefficients={"attn": args.attn, "mlp": args.mlp})
    plan.notes.update({"model": vlm.name, "examples": len(result.traces), "skipped": len(result.skipped),
                       "noise": args.noise, "recovery": {c: [float(v) for v in rr.sel(component=c).values]
                                                          for c in rr.coords["component"].values}})
    plan.save(out)
    print(rr.to_pandas().round(3).to_string())
    print(f"plan: {plan.targets} coefficients {plan.coefficients}; wrote {out}")
    return 0


def _add_benchmark_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options of every benchmark command: where the questions come from and where results go."""
    p.add_argument("--questions", help="folder with <split>.jsonl, captions.jsonl and images/ (default: the built-in "
                   "shapes-world set, written to OUT/pope_set)")
    p.add_argument("--images", type=_positive, help="images in the built-in set (default 400, as the organism cards "
                   "use); not with --questions")
    p.add_argument("--out", default=default_out)
    p.set_defaults(check=lambda args: _check_benchmark_args(args, p))


def _add_pope_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options of the POPE commands (pope, compare)."""
    _add_benchmark_args(p, default_out)
    p.add_argument("--splits", nargs="+", default=["random", "popular", "adversarial"])
    p.add_argument("--suffix", default="", help="text appended to every question (recorded with each answer)")
    p.add_argument("--max-new-tokens", type=_positive, default=8, help="tokens generated per answer (default 8)")


def _load_image(spec: str, question: str):
    """An image from a path, or ``shapes:SEED`` for a rendered shapes-world scene (with the queried object's mask)."""
    from PIL import Image

    if spec.startswith("shapes:"):
        from vlm_interp.zoo.organisms import ORGANISM_WORLD
        from vlm_interp.zoo.shapes import World

        scene = World(ORGANISM_WORLD).scene(int(spec.split(":", 1)[1]))
        named = [o for o in scene.objects if o.shape in question.lower()]
        return scene.pil(), (named[0].mask if named else None)
    return Image.open(spec).convert("RGB"), None


def _trace(args: argparse.Namespace) -> int:
    import json

    import torch

    import vlm_interp as vi
    from vlm_interp.corruptions import from_spec
    from vlm_interp.tracing import trace
    from vlm_interp.tracing.engine import FAST_PATHS
    from vlm_interp.tracing.plot import plot_image_effects, plot_trace

    vlm = vi.load(args.model)
    image, mask = _load_image(args.image, args.question)
    region = tuple(float(v) for v in args.region.split(",")) if args.region else mask
    ex = vlm.prepare(image, args.question, region=region)
    answer = args.answer
    if answer is None:  # trace the model's own first answer token, as ROME does
        top = int(torch.argmax(vlm.first_token_logits(ex)))
        answer = vlm.tokenizer.decode([top]).strip()
    ex.answer, ex.answer_ids = answer, vlm.encode_answer(ex, answer)
    corrupt = from_spec(vlm, ex, args.corrupt)
    corrupt.meta["corruption"] = args.corrupt
    tokens = args.tokens if args.tokens in ("each", "all") else args.tokens.split(",")
    components = [c if "." in c else f"{args.tower}.{c}" for c in args.components.split(",")]
    tr = trace(vlm, ex, corrupt, components=components, tokens=tokens, window=args.window, metric=args.metric,
               fast_path=FAST_PATHS[args.path])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [tr.save(out / "trace.json"), plot_trace(tr, out / "trace.png")]
    if tokens == "each" and ex.boxes.get(args.tower) and "hidden" in tr.data.coords["component"].values:
        files.append(plot_image_effects(tr, ex, out / "image_effects.png", tower=args.tower))
    rr = tr.rr()
    best = rr.where(rr == rr.max(), drop=True)
    summary = {"question": args.question, "answer": answer, "corruption": args.corrupt,
               "clean_score": tr.attrs["clean_score"], "corrupt_score": tr.attrs["corrupt_score"],
               "metric": args.metric, "path": args.path, "best_cell": {k: str(v.values[0]) for k, v in best.coords.items()},
               "best_rr": float(rr.max())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.question} -> {answer!r}: {args.metric} clean {summary['clean_score']:.4f}, corrupted "
          f"{summary['corrupt_score']:.4f} ({args.corrupt})")
    print(f"strongest restoration: rr {summary['best_rr']:.3f} at {summary['best_cell']}")
    print("wrote " + ", ".join(str(f) for f in files) + f", {out / 'summary.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-interp",
        description="Causal interpretability for vision-language models: trace, intervene, compare hallucination.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on an embedded default model: ask about a rendered scene")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    demo.add_argument("--seed", type=int, default=1, help="seed of the rendered shapes scene")
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
    tr = sub.add_parser("trace", help="causal tracing of one example: corrupt, restore each site, plot the effects")
    tr.add_argument("--model", default=DEFAULT_MODEL)
    tr.add_argument("--image", required=True, help="image path, or shapes:SEED for a rendered shapes-world scene")
    tr.add_argument("--question", required=True)
    tr.add_argument("--answer", help="answer to trace (default: the model's own first token)")
    tr.add_argument("--corrupt", default="noise", help="noise[:scale=3sd,tokens=image,place=embeddings,seed=0] | "
                    "pair:PATH | str:circle=square | edit[:fill=blur]")
    tr.add_argument("--region", help="object box x0,y0,x1,y1 in image pixels (shapes:SEED finds the asked object)")
    tr.add_argument("--tower", default="lm")
    tr.add_argument("--components", default="hidden,attn,mlp")
    tr.add_argument("--tokens", default="each", help="each | all | comma-separated token groups")
    tr.add_argument("--window", type=_positive, default=1,
                    help="layers restored together around each layer (ROME's window; default 1)")
    tr.add_argument("--metric", default="prob", choices=["prob", "logprob"])
    tr.set_defaults(check=lambda args: _check_trace_args(args, tr))
    tr.add_argument("--path", default="auto", choices=["auto", "fast", "general"],
                    help="auto: start LM cells inside the LM where that applies, else whole-model forwards with a "
                         "warning (same numbers); fast: require the fast path (error if it cannot apply); general: "
                         "whole-model forwards only")
    tr.add_argument("--out", default="vlm-interp-trace")
    tr.set_defaults(run=_trace)
    pope = sub.add_parser("pope", help="POPE on one model; shard with `accelerate launch -m vlm_interp.cli pope ...`")
    pope.add_argument("--model", default=DEFAULT_MODEL)
    pope.add_argument("--intervention", help=INTERVENTION_HELP)
    _add_pope_args(pope, "vlm-interp-pope")
    pope.set_defaults(run=_pope)
    chair = sub.add_parser("chair", help="CHAIR on captions generated by one model")
    chair.add_argument("--model", default=DEFAULT_MODEL)
    chair.add_argument("--vocab", default="shapes", help="built-in vocabulary (shapes, coco) or a JSON file")
    chair.add_argument("--prompt", default="Describe the image.")
    chair.add_argument("--limit", type=_positive, help="caption only the first N images")
    chair.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens per caption (default 32)")
    chair.add_argument("--intervention", help=INTERVENTION_HELP)
    _add_benchmark_args(chair, "vlm-interp-chair")
    chair.set_defaults(run=_chair)
    comp = sub.add_parser("compare", help="several models side by side on the same questions, with paired tests")
    comp.add_argument("--models", nargs="+", required=True)
    comp.add_argument("--benchmark", default="pope", choices=["pope"])
    comp.add_argument("--intervention", action="append", help="[NAME=]SPEC, repeatable; every model is also run "
                      "without intervention. " + INTERVENTION_HELP)
    _add_pope_args(comp, "vlm-interp-compare")
    comp.set_defaults(run=_compare)
    heads = sub.add_parser("heads", help="attention-head scores for interventions")
    heads_sub = heads.add_subparsers(dest="heads_command", required=True)
    hs = heads_sub.add_parser("score", help="ablate each head on calibration questions and score it (V-SEAM)")
    hs.add_argument("--model", default=DEFAULT_MODEL)
    hs.add_argument("--level", default="object", choices=["object", "attribute", "relation"],
                    help="shapes-world calibration questions: existence, colour or relation")
    hs.add_argument("--n", type=_positive, default=100, help="calibration questions")
    hs.add_argument("--seed", type=int, default=20_011, help="calibration seed (disjoint from training and evaluation)")
    hs.add_argument("--tower", default="lm")
    hs.add_argument("--component", default="head", choices=["head", "xattn_head"])
    hs.add_argument("--ablation", default="mean", choices=["mean", "zero", "dataset_mean"])
    hs.add_argument("--top", type=_positive, default=8, help="heads to print")
    hs.add_argument("--out", default="head-scores.nc", help=".nc or .json; per-example parts go next to it")
    hs.set_defaults(run=_heads_score)
    iri = sub.add_parser("iri", help="intermediate representation injection plans")
    iri_sub = iri.add_subparsers(dest="iri_command", required=True)
    ip = iri_sub.add_parser("plan", help="trace calibration questions (noise on the image) and plan IRI from the "
                            "layers whose last-token attention/MLP recover most")
    ip.add_argument("--model", default=DEFAULT_MODEL)
    ip.add_argument("--n", type=_positive, default=60, help="calibration questions (positives; wrong answers skipped)")
    ip.add_argument("--seed", type=int, default=20_011)
    ip.add_argument("--noise", default="3sd")
    ip.add_argument("--k", type=_positive, default=2, help="source layers per component")
    ip.add_argument("--attn", type=float, default=0.5, help="coefficient of attention injection")
    ip.add_argument("--mlp", type=float, default=0.5, help="coefficient of MLP injection")
    ip.add_argument("--out", default="iri-plan.json")
    ip.set_defaults(run=_iri_plan)
    fams = sub.add_parser("families", help="list the supported model classes")
    fams.set_defaults(run=_families)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "check" in args:  # options that cannot be honoured together end here, with a usage error
        args.check(args)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the command's output to what it says itself
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
