"""Time the tracing engine against one forward per cell, on shapes-llava and on a compute-bound random LLaVA.

For each model, in one run: (a) a plain loop written here (capture the clean value of every
site with raw torch hooks in one forward, then one forward of the corrupted example per
cell with one raw hook restoring that cell), and (b) ``vlm_interp.tracing.trace`` on the same
full hidden/attn/mlp x layer x token grid, corrupted by 3 sd noise on the image embeddings.
Prints both times, their ratio and the largest difference between the two grids.

    python benchmarks/bench_trace.py                      # both models, full grids
    python benchmarks/bench_trace.py --models random --layers 4 --width 256 --image-size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch
from tqdm.auto import tqdm

import vlm_interp as vi
from vlm_interp.corruptions import applied, noise
from vlm_interp.tracing import trace

COMPONENTS = ("hidden", "attn", "mlp")


def shapes_llava(seed: int):
    """The shapes-llava organism and a scene question about its first object."""
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load("zoo:shapes-llava")
    scene = World(ORGANISM_WORLD).scene(seed)
    return vlm, scene.pil(), existence_question(scene.objects[0].shape)


def random_llava(layers: int, width: int, image_size: int, seed: int):
    """A random LLaVA whose Llama LM has ``layers`` layers of ``width`` (compute-bound), with a small CLIP tower."""
    import transformers as tf

    from vlm_interp.tiny import PATCH, word_tokenizer

    torch.manual_seed(seed)
    tok = word_tokenizer()
    text = tf.LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=layers,
                          num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                          vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=0, bos_token_id=2,
                          eos_token_id=3)
    vision = tf.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=image_size, patch_size=PATCH)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                            image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = tf.LlavaForConditionalGeneration(config).eval()
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(seed)
    from PIL import Image

    image = Image.fromarray((rng.random((image_size, image_size, 3)) * 255).astype("uint8"))
    return vi.wrap(model, processor, name=f"random-llava-{layers}x{width}"), image, "Is there a red circle ?"


def raw_hook(module: torch.nn.Module, fn):
    """A plain torch forward hook applying ``fn`` to the module's output tensor (or first element)."""
    def run(m, args, out):
        if torch.is_tensor(out):
            return fn(out)
        return (fn(out[0]), *out[1:])
    return module.register_forward_hook(run)


def plain_loop(vlm, clean, corrupt, answer_id: int, progress: bool) -> np.ndarray:
    """(component, layer, position) probabilities of the answer, one forward of ``corrupt`` per cell."""
    n_layers, seq = vlm.adapter.n_layers["lm"], clean.n_tokens
    paths = {(c, l): vlm.adapter.module_path("lm", c, l) for c in COMPONENTS for l in range(n_layers)}
    clean_values, handles = {}, []
    for key, path in paths.items():
        def keep(t, key=key):
            clean_values[key] = t.detach().clone()
            return t
        handles.append(raw_hook(vlm.model.get_submodule(path), keep))
    try:
        with torch.no_grad():
            vlm.logits(clean.inputs)
    finally:
        for h in handles:
            h.remove()
    answer_at = vlm.answer_start(corrupt)
    grid = np.zeros((len(COMPONENTS), n_layers, seq))
    cells = [(k, c, l, p) for k, c in enumerate(COMPONENTS) for l in range(n_layers) for p in range(seq)]
    for k, c, l, p in tqdm(cells, desc="plain loop", disable=not progress, leave=False):
        def restore(t, src=clean_values[(c, l)], p=p):
            t = t.clone()
            t[:, p] = src[:, p]
            return t
        handle = raw_hook(vlm.model.get_submodule(paths[(c, l)]), restore)
        try:
            with torch.no_grad(), applied(vlm, corrupt):
                logits = vlm.logits(corrupt.inputs)
        finally:
            handle.remove()
        grid[k, l, p] = float(torch.softmax(logits[0, answer_at].float(), -1)[answer_id])
    return grid


def compare(label: str, vlm, image, question: str, batch_size, progress: bool) -> float:
    """Time the plain loop and the engine on one example; print times, ratio and max difference."""
    clean = vlm.prepare(image, question, answer="yes")
    corrupt = noise(vlm, clean, scale="3sd", tokens="image", seed=0)
    answer_id = vlm.encode_answer(clean, "yes")[0]
    n_cells = len(COMPONENTS) * vlm.adapter.n_layers["lm"] * clean.n_tokens
    t0 = time.perf_counter()
    expected = plain_loop(vlm, clean, corrupt, answer_id, progress)
    t1 = time.perf_counter()
    tr = trace(vlm, clean, corrupt, components=[f"lm.{c}" for c in COMPONENTS], tokens="each",
               batch_size=batch_size, progress=progress)
    t2 = time.perf_counter()
    diff = float(np.abs(tr.data.values - expected).max())
    plain, engine = t1 - t0, t2 - t1
    print(f"{label}: {n_cells} cells ({len(COMPONENTS)} components x {vlm.adapter.n_layers['lm']} layers x "
          f"{clean.n_tokens} tokens)\n  one forward per cell {plain:7.2f} s\n  engine               {engine:7.2f} s"
          f"\n  ratio                {plain / engine:7.1f}x\n  max |difference|     {diff:.2e}", flush=True)
    return plain / engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes", "random"], choices=["shapes", "random"])
    ap.add_argument("--layers", type=int, default=8, help="LM layers of the random LLaVA")
    ap.add_argument("--width", type=int, default=512, help="LM width of the random LLaVA")
    ap.add_argument("--image-size", type=int, default=32, help="image side of the random LLaVA (8-pixel patches)")
    ap.add_argument("--seed", type=int, default=1, help="shapes scene and random-model seed")
    ap.add_argument("--batch-size", default="auto", help="engine batch size (an integer or 'auto')")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; 1 avoids oversubscribing a shared machine)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "shapes" in args.models:
        compare("shapes-llava", *shapes_llava(args.seed), batch, not args.no_progress)
    if "random" in args.models:
        label = f"random LLaVA, {args.layers}-layer {args.width}-wide Llama"
        compare(label, *random_llava(args.layers, args.width, args.image_size, args.seed), batch,
                not args.no_progress)


if __name__ == "__main__":
    main()
