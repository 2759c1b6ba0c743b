"""vlm-interp lens, knockout, attention: the methods beyond patching, on one example."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEFAULT_MODEL, load_image, positive

EDGES = "image->question,image->last,question->last,object->last"


def _prepare(args: argparse.Namespace):
    """(model, example with its answer): the answer is ``--answer`` or the model's own first token, as in trace."""
    import torch

    import vlm_interp as vi

    vlm = vi.load(args.model)
    image, mask = load_image(args.image, args.question)
    region = tuple(float(v) for v in args.region.split(",")) if args.region else mask
    ex = vlm.prepare(image, args.question, region=region)
    answer = args.answer
    if answer is None:
        top = int(torch.argmax(vlm.first_token_logits(ex)))
        answer = vlm.tokenizer.decode([top]).strip()
    ex.answer, ex.answer_ids = answer, vlm.encode_answer(ex, answer)
    return vlm, ex


def _out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _record(args: argparse.Namespace, command: str, vlm, ex, files: list, results: list[dict], settings: dict) -> None:
    """run.json (with the example's image and boxes) and report.html of one method's run."""
    from vlm_interp.runs import report_run, save_example, write_manifest

    out = Path(args.out)
    files = files + [save_example(ex, out)] + ([out / "image.png"] if ex.image is not None else [])
    write_manifest(out, command, vlm=vlm, inputs={"image": args.image, "question": args.question, "answer": ex.answer,
                                                  "region": args.region}, settings=settings, results=results,
                   files=files)
    print(f"report: {report_run(out)}")


def _edges(text: str) -> list[tuple[str, str]]:
    edges = []
    for item in text.split(","):
        source, sep, target = item.strip().partition("->")
        if not sep or not source or not target:
            raise argparse.ArgumentTypeError(f"edge {item!r} is not SOURCE->TARGET (token groups, e.g. image->last)")
        edges.append((source, target))
    return edges


def _heads(text: str):
    if text in ("all", "each"):
        return None if text == "all" else "each"
    try:
        return [int(h) for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heads takes all, each or comma-separated head numbers, not {text!r}") \
            from None


def _layers(text: str | None):
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer numbers, not {text!r}") from None


def _lens(args: argparse.Namespace) -> int:
    from vlm_interp.tracing.lens import logit_lens

    vlm, ex = _prepare(args)
    tokens = args.tokens if args.tokens == "each" else args.tokens.split(",")
    sites = [s if "." in s else f"lm.{s}" for s in args.sites.split(",")]
    lens = logit_lens(vlm, ex, sites, tokens=tokens, k=args.k)
    out = _out(args)
    component = sites[0].split(".")[1]
    files = [lens.save(out / "lens.json"), lens.plot(out / "lens.png", component)]
    if any(int(p) in ex.boxes.get("lm", {}) for p in lens.data.coords["position"].values):
        files += [lens.plot_image(ex, out / "lens_image.png", component, show="top"),
                  lens.plot_image(ex, out / "lens_image_prob.png", component, show="prob")]
    last = ex.groups["lm"]["last"][0]
    print(f"{args.question} -> {ex.answer!r}; logit lens at the last position ({component}):")
    if last in [int(p) for p in lens.data.coords["position"].values]:
        column = lens.data.sel(component=component, position=last)
        k = [int(p) for p in lens.data.coords["position"].values].index(last)
        for layer in range(lens.data.sizes["layer"]):
            print(f"  layer {layer}: P({ex.answer!r}) {float(column.sel(quantity='prob', layer=layer)):.4f}, "
                  f"rank {int(column.sel(quantity='rank', layer=layer))}, top "
                  f"{[row for row in lens.attrs['top_tokens'][component][layer][k]]}")
    print("wrote " + ", ".join(str(f) for f in files))
    _record(args, "lens", vlm, ex, files, [{"file": "lens.json", "kind": "lens", "title": "Logit lens"}],
            {"sites": sites, "tokens": args.tokens, "k": args.k})
    return 0


def _knockout(args: argparse.Namespace) -> int:
    from vlm_interp.tracing.knockout import DEFAULT_EDGES, knockout

    vlm, ex = _prepare(args)
    edges = args.edges if args.edges_given else DEFAULT_EDGES  # the default list leaves the object edge out without a region
    result = knockout(vlm, ex, edges=edges, tower=args.tower, component=args.component, window=args.window,
                      layers=args.layers, heads=args.heads, metric=args.metric, other=args.other)
    out = _out(args)
    files = [result.save(out / "knockout.json"), result.plot(out / "knockout.png")]
    rel = result.relative()
    if "head" in rel.dims:
        rel = rel.mean("head")
    print(f"{args.question} -> {ex.answer!r}: {args.metric} uncut {result.attrs['clean_score']:.4f}; relative change "
          f"with the edge cut (window {args.window}):")
    for edge in rel.coords["edge"].values:
        changes = ", ".join(f"L{int(l)} {100 * float(v):+.1f}%" for l, v in zip(rel.coords["layer"].values,
                                                                                rel.sel(edge=edge).values))
        print(f"  {edge}: {changes}")
    print("wrote " + ", ".join(str(f) for f in files))
    _record(args, "knockout", vlm, ex, files, [{"file": "knockout.json", "kind": "knockout",
                                                "title": "Attention knockout"}],
            {"edges": [f"{s}->{t}" for s, t in edges], "tower": args.tower, "component": args.component,
             "window": args.window, "layers": args.layers, "heads": args.heads, "metric": args.metric})
    return 0


def _attention(args: argparse.Namespace) -> int:
    from vlm_interp.tracing.attention import attention_maps
    from vlm_interp.tracing.knockout import knockout

    vlm, ex = _prepare(args)
    maps = attention_maps(vlm, ex, tower=args.tower, component=args.component, query=args.query, layers=args.layers)
    result = None
    if args.knockout:
        keys = ex.groups.get(maps.attrs["keys_tower"], {})
        edges = [("image", args.query)] + ([("object", args.query)] if keys.get("object") else [])
        result = knockout(vlm, ex, edges=edges, tower=args.tower, component=args.component)
    out = _out(args)
    files = [maps.save(out / "attention.json"), maps.plot(ex, out / "attention.png", knockout=result)]
    if result is not None:
        files.append(result.save(out / "knockout.json"))
    print(f"{args.tower}.{args.component} attention from {args.query!r}: {maps.attrs['causal']}")
    image = [p for p, g in enumerate(maps.data.coords["group"].values) if g in ("image", "object")]
    if image:
        share = maps.mean_heads().isel(position=image).sum("position")
        print("  share of attention on the image per layer: "
              + ", ".join(f"L{int(l)} {float(v):.3f}" for l, v in zip(share.coords["layer"].values, share.values)))
    print("wrote " + ", ".join(str(f) for f in files))
    results = [{"file": "attention.json", "kind": "attention", "title": "Attention maps (correlational)"}]
    if result is not None:
        results.append({"file": "knockout.json", "kind": "knockout", "title": "Attention knockout (causal)"})
    _record(args, "attention", vlm, ex, files, results, {"tower": args.tower, "component": args.component,
                                                         "query": args.query, "layers": args.layers,
                                                         "knockout": args.knockout})
    return 0


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--image", required=True, help="image path, or shapes:SEED for a rendered shapes-world scene")
    parser.add_argument("--question", required=True)
    parser.add_argument("--answer", help="answer to measure (default: the model's own first token)")
    parser.add_argument("--region", help="object box x0,y0,x1,y1 in image pixels (shapes:SEED finds the asked object)")
    parser.add_argument("--out", default=out)


class _EdgesAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.edges_given = True


def add(sub) -> None:
    """Register this group's commands on the ``vlm-interp`` subparsers."""
    lens = sub.add_parser("lens", help="logit lens: the LM's own final norm and unembedding at every layer and token")
    _common(lens, "vlm-interp-lens")
    lens.add_argument("--sites", default="hidden", help="residual-stream components: hidden, input (comma-separated)")
    lens.add_argument("--tokens", default="each", help="each | comma-separated token groups")
    lens.add_argument("--k", type=positive, default=5, help="top tokens kept per layer and position")
    lens.set_defaults(run=_lens)

    ko = sub.add_parser("knockout", help="attention knockout: cut edges between token groups in windows of layers")
    _common(ko, "vlm-interp-knockout")
    ko.add_argument("--edges", type=_edges, default=None, action=_EdgesAction,
                    help=f"SOURCE->TARGET token groups, comma-separated (default {EDGES}; the object edge needs a "
                         "region)")
    ko.add_argument("--tower", default="lm")
    ko.add_argument("--component", default="attn", choices=["attn", "xattn"],
                    help="self-attention, or cross-attention (Q-Former queries -> image patches)")
    ko.add_argument("--window", type=positive, default=1, help="layers cut together around each layer (default 1)")
    ko.add_argument("--layers", type=_layers, help="centre layers (default all)")
    ko.add_argument("--heads", type=_heads, default=None, help="all (default) | each | comma-separated heads")
    ko.add_argument("--metric", default="prob", choices=["prob", "logprob", "logit_diff"])
    ko.add_argument("--other", help="the other answer for --metric logit_diff")
    ko.set_defaults(run=_knockout, edges_given=False,
                    check=lambda a: ko.error("--metric logit_diff needs --other") if a.metric == "logit_diff"
                    and not a.other else None)

    at = sub.add_parser("attention", help="attention maps over the image per layer and head, and rollout "
                                          "(correlational; --knockout adds the causal knockout next to them)")
    _common(at, "vlm-interp-attention")
    at.add_argument("--tower", default="lm")
    at.add_argument("--component", default="attn", choices=["attn", "xattn"])
    at.add_argument("--query", default="last", help="token group whose attention is drawn (Q-Former: image)")
    at.add_argument("--layers", type=_layers, help="layers to draw (default all, with rollout)")
    at.add_argument("--knockout", action="store_true", help="also cut image->QUERY (and object->QUERY) edges per layer")
    at.set_defaults(run=_attention)
