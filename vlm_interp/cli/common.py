"""What the command groups share: defaults, argument types, images and interventions from options."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "zoo:shapes-llava"
INTERVENTION_HELP = ("intervention during answering: heads:SCORES.nc,lambda=1 (V-SEAM head modulation), "
                     "vhr:alpha=2[,layers=1-3], iri:PLAN.json, scale:lm.head.2.1=1.5+lm.head.3.0=0, "
                     "vcd:alpha=1[,beta=0.1,noise=500,seed=0] (visual contrastive decoding), "
                     "pai:alpha=0.2[,gamma=0.1,start=2,end=N,beta=0.1] (PAI; gamma is the paper's gamma minus 1)")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (counts such as --images, --n, --limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def load_image(spec: str, question: str):
    """An image from a path, or ``shapes:SEED`` for a rendered shapes-world scene (with the queried object's mask)."""
    from PIL import Image

    if spec.startswith("shapes:"):
        from vlm_interp.zoo.organisms import ORGANISM_WORLD
        from vlm_interp.zoo.shapes import World

        scene = World(ORGANISM_WORLD).scene(int(spec.split(":", 1)[1]))
        named = [o for o in scene.objects if o.shape in question.lower()]
        return scene.pil(), (named[0].mask if named else None)
    return Image.open(spec).convert("RGB"), None


def intervention_context(args: argparse.Namespace, vlm):
    """The context of ``--intervention SPEC`` for one model (a no-op context without it)."""
    import contextlib

    from vlm_interp.interventions import from_spec

    return from_spec(args.intervention)(vlm) if args.intervention else contextlib.nullcontext()


def named_interventions(specs: list[str] | None) -> dict:
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


def add_load_args(p: argparse.ArgumentParser) -> None:
    """Where and in what precision the models of a command load (see :func:`vlm_interp.load`)."""
    p.add_argument("--dtype", help="weights' type: bf16, fp16, fp32 or auto (default: what transformers picks)")
    place = p.add_mutually_exclusive_group()
    place.add_argument("--device", help="device for the whole model, e.g. cuda:0 (default cpu)")
    place.add_argument("--device-map", help="let accelerate place the model: auto, balanced, sequential")
    p.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE",
                   help="memory per device for --device-map, e.g. 0=70GiB 1=70GiB cpu=100GiB")
    p.add_argument("--offload-folder", help="folder for weights --device-map offloads to disk")


def load_options(args: argparse.Namespace) -> dict:
    """The keywords of :func:`vlm_interp.load` that the options of :func:`add_load_args` give."""
    memory = None
    if args.max_memory:
        memory = {}
        for item in args.max_memory:
            device, sep, size = item.partition("=")
            if not sep or not size:
                raise SystemExit(f"--max-memory {item!r}: write DEVICE=SIZE, for example 0=70GiB or cpu=100GiB")
            memory[int(device) if device.isdigit() else device] = size
    options = {"dtype": args.dtype, "device": args.device, "device_map": args.device_map, "max_memory": memory,
               "offload_folder": args.offload_folder}
    return {k: v for k, v in options.items() if v is not None}


def load_model(args: argparse.Namespace, name: str | None = None):
    """The VLM named by ``--model`` (or ``name``), loaded with the command's placement options."""
    import vlm_interp as vi

    return vi.load(name or args.model, **load_options(args))
