"""The GPU check: vlm-interp at the size of LLaVA-1.5-7B, on randomly initialised weights (no download).

Builds a LlavaForConditionalGeneration with the real LLaVA-1.5-7B configuration (CLIP ViT-L/14 at 336 pixels,
576 image tokens, a Vicuna-7B-sized Llama: 32 layers, 4096 wide, 32 heads) in bf16 on one GPU, and reports,
as ratios measured in this one run:

* tracing: the engine on a hidden/attn/mlp x layer x every-token grid against one forward per cell. The full
  grid is about 57,000 cells, so the engine traces a seeded stride of layers (every token, all three
  components) and the loop times a seeded sample of cells; both are extrapolated to the full grid, and the
  output says so. The peak GPU memory of the sweep is reported against the engine's plan;
* the fast path's self-check margin in bf16 and fp16 (the largest replay error against the tolerance);
* generate: per-token overhead of each intervention (head modulation, VHR, IRI) against plain generation;
* POPE: questions per second in batches against one at a time, and how many answers agree.

    PYTHONPATH=. python benchmarks/gpu_check.py              # on a GPU, bf16, about 4 minutes on one H200
    PYTHONPATH=. python benchmarks/gpu_check.py --small      # the same code at toy size on CPU, in seconds

Only torch, transformers, numpy and PIL are needed; everything else is imported where used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

GiB = 2 ** 30
LLAVA_7B = {  # llava-hf/llava-1.5-7b-hf's config.json, the parts that set sizes
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768),
    "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
}
SMALL = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=56, patch_size=14, projection_dim=32),
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, vocab_size=512),
}


def build(sizes: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised LLaVA of ``sizes`` on ``device``, wrapped, with an offline processor."""
    import transformers as tf

    import vlm_interp as vi
    from vlm_interp.tiny import word_tokenizer

    tok = word_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    text = tf.LlamaConfig(**sizes["text"], pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**sizes["vision"]), text_config=text,
                            image_token_index=image_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    side = sizes["vision"]["image_size"]
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=sizes["vision"]["patch_size"],
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return vi.wrap(model, processor, name="random LLaVA-1.5-7B" if sizes is LLAVA_7B else "random small LLaVA")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def pair(vlm, seed: int = 0):
    """A shapes-world scene, its existence question answered "yes", and 3 sd noise on the image embeddings."""
    from vlm_interp.corruptions import noise
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    scene = World(ORGANISM_WORLD).scene(seed)
    clean = vlm.prepare(scene.pil(), existence_question(scene.objects[0].shape), answer="yes")
    return clean, noise(vlm, clean, scale="3sd", tokens="image", seed=0)


# ---- tracing: engine against a plain loop ----------------------------------------------------------------------
def plain_cell(vlm, corrupt, source, site, position: int, answer_id: int) -> float:
    """One forward per cell: restore ``site`` at ``position`` with one raw hook (no engine), answer probability."""
    from vlm_interp.corruptions import applied

    module = vlm.model.get_submodule(vlm.adapter.module_path(site.tower, site.component, site.layer))

    def restore(m, a, out):
        t = out if torch.is_tensor(out) else out[0]
        t = t.clone()
        t[:, position] = source[site][:, position].to(t.device, t.dtype)
        return t if torch.is_tensor(out) else (t, *out[1:])

    handle = module.register_forward_hook(restore)
    try:
        with torch.no_grad(), applied(vlm, corrupt):
            logits = vlm.logits(corrupt.inputs)[0, vlm.answer_start(corrupt)].float()
    finally:
        handle.remove()
    return float(torch.softmax(logits, -1)[answer_id])


def check_trace(vlm, clean, corrupt, stride: int, loop_cells: int, seed: int) -> dict:
    from vlm_interp.sites import Site
    from vlm_interp.tracing import fast
    from vlm_interp.tracing.engine import Cell, run_cells, site_activations
    from vlm_interp.tracing.memory import planned_bytes
    from vlm_interp.tracing.metrics import make_metric

    device, rng = vlm.device, np.random.default_rng(seed)
    n_layers, n_tokens = vlm.adapter.n_layers["lm"], clean.n_tokens
    components = ("hidden", "attn", "mlp")
    layers = list(range(int(rng.integers(stride)), n_layers, stride))
    cells = [Cell((Site("lm", c, l),), (p,)) for c in components for l in layers for p in range(n_tokens)]
    metric = make_metric(vlm, clean, "prob")
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    engine_s, values = timed(lambda: run_cells(vlm, corrupt, source, cells, metric, batch_size="auto",
                                               progress=False), device)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    full = len(components) * n_layers * n_tokens
    sample = rng.choice(len(cells), size=min(loop_cells, len(cells)), replace=False)
    plain_cell(vlm, corrupt, source, cells[0].sites[0], 0, metric.answer)  # warm-up
    loop_s, loop_values = timed(lambda: [plain_cell(vlm, corrupt, source, cells[i].sites[0], cells[i].positions[0],
                                                    metric.answer) for i in sample], device)
    engine_full = engine_s * n_layers / len(layers)
    loop_full = loop_s / len(sample) * full
    state, _ = fast.lm_start(vlm, corrupt)  # what the engine plans with (the fast path's rows)
    plan = planned_bytes(vlm, corrupt, "auto", len(cells), state)
    recorded = 0 if state is None else sum(t.numel() * t.element_size() for x in state.inputs
                                           for t in [x.hidden, *(x.kv or ())])
    return {"tokens": n_tokens, "full_grid_cells": full, "traced_layers": layers, "traced_cells": len(cells),
            "engine_s": engine_s, "engine_full_grid_s (extrapolated)": engine_full,
            "loop_cells_timed": len(sample), "loop_s_per_cell": loop_s / len(sample),
            "loop_full_grid_s (extrapolated)": loop_full, "engine_vs_loop": loop_full / engine_full,
            "max_abs_diff_engine_vs_loop": float(np.max(np.abs(values.numpy()[sample] - np.array(loop_values)))),
            "peak_gib": None if peak is None else peak / GiB, "planned_rows": plan["rows"],
            "planned_bound_gib": plan["bound"] / GiB, "recorded_state_gib": recorded / GiB}


def self_check_margin(vlm, corrupt) -> dict:
    """The fast path's self-check on this model: whether it applies, and its worst replay error against the tolerance."""
    from vlm_interp.tracing import fast

    state, why = fast.lm_start(vlm, corrupt)
    if state is None:
        return {"applies": False, "why": why}
    checks, _ = fast.probes(vlm, corrupt, state)
    positions = fast.restart_positions(state, checks) if state.kv_reuse else (0,)
    worst = max(err for position in positions for probe in checks
                for err, _ in fast.replay_errors(vlm, state, probe, position))
    tol = fast.tolerance(state)
    return {"applies": True, "kv_reuse": state.kv_reuse, "worst_replay_error": worst, "tolerance": tol,
            "error_over_tolerance": worst / tol}


# ---- generate with interventions -------------------------------------------------------------------------------
def check_generate(vlm, clean, new_tokens: int) -> dict:
    from vlm_interp.interventions import InjectionPlan, inject, modulate_heads, vhr

    device, n = vlm.device, vlm.adapter.n_layers["lm"]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run():
        with torch.no_grad():
            return vlm.model.generate(**clean.inputs, **kw)

    run()  # warm-up
    plain_s, _ = timed(run, device)
    plan = InjectionPlan({"attn": {t: {n // 4: 1.0} for t in range(n // 2, n)}}, {"attn": 0.5})
    contexts = {"modulate 8 heads": lambda: modulate_heads(vlm, {f"lm.head.{l}.{h}": 1.5 for l in (1, 2)
                                                                 for h in range(4)}),
                "VHR (alpha 2)": lambda: vhr(vlm, alpha=2.0), "IRI (attn, half the layers)": lambda: inject(vlm, plan)}
    out = {"new_tokens": new_tokens, "plain_ms_per_token": 1000 * plain_s / new_tokens}
    for name, make in contexts.items():
        with make():
            seconds, _ = timed(run, device)
        out[f"{name}: ms per token over plain"] = 1000 * (seconds - plain_s) / new_tokens
        out[f"{name}: time vs plain"] = seconds / plain_s
    return out


# ---- POPE batched against one at a time ------------------------------------------------------------------------
def check_pope(vlm, n_images: int, batch_size: int) -> dict:
    from vlm_interp.hallucination.compare import read_pope_folder
    from vlm_interp.hallucination.pope import load_results, run_pope
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.pope_set import write_pope
    from vlm_interp.zoo.shapes import World

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pope(World(ORGANISM_WORLD), folder, n_images=n_images, seed=3, splits=("random",), per_image=2)
        items = read_pope_folder(folder, ["random"])
        run_pope(vlm, items[:1], folder / "images", folder / "warm.jsonl", progress=False)
        frames = {}
        for size in (1, batch_size):
            seconds, _ = timed(lambda: run_pope(vlm, items, folder / "images", folder / f"b{size}.jsonl",
                                                batch_size=size, progress=False), vlm.device)
            frames[size] = (seconds, load_results(folder / f"b{size}.jsonl").sort_values("question_id"))
    (one_s, one), (many_s, many) = frames[1], frames[batch_size]
    agree = {c: int((one[c].to_numpy() == many[c].to_numpy()).sum()) for c in ("logit_answer", "answer_text")}
    return {"questions": len(items), "batch_size": batch_size, "one_at_a_time_qps": len(items) / one_s,
            "batched_qps": len(items) / many_s, "batched_vs_one": one_s / many_s,
            "same_logit_answer": agree["logit_answer"], "same_generation": agree["answer_text"],
            "max_p_yes_difference": float(np.abs(one["p_yes"].to_numpy() - many["p_yes"].to_numpy()).max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy sizes on CPU (the test suite runs this)")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--stride", type=int, help="trace every STRIDE-th layer (default 8; --small: 2)")
    ap.add_argument("--loop-cells", type=int, help="cells the one-forward-per-cell loop times (default 24; --small: 6)")
    ap.add_argument("--new-tokens", type=int, help="tokens per generation (default 32; --small: 4)")
    ap.add_argument("--pope-images", type=int, help="images of the POPE set (default 24; --small: 2)")
    ap.add_argument("--batch-size", type=int, help="POPE batch size (default 16; --small: 4)")
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 self-check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    sizes = SMALL if args.small else LLAVA_7B
    dtype = torch.float32 if args.small and device == "cpu" else torch.bfloat16
    stride = args.stride or (2 if args.small else 8)
    for key, full, small in (("loop_cells", 24, 6), ("new_tokens", 32, 4), ("pope_images", 24, 2), ("batch_size", 16, 4)):
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)
                    if device.startswith("cuda") else "cpu", "dtype": str(dtype).removeprefix("torch.")}
    import transformers

    report["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    vlm = build(sizes, device, dtype, args.seed)
    report["build_s"] = time.perf_counter() - t0
    report["parameters_billions"] = sum(p.numel() for p in vlm.model.parameters()) / 1e9
    clean, corrupt = pair(vlm, args.seed)
    sections = {"self_check": lambda: self_check_margin(vlm, corrupt),
                "trace": lambda: check_trace(vlm, clean, corrupt, stride, args.loop_cells, args.seed),
                "generate": lambda: check_generate(vlm, clean, args.new_tokens),
                "pope": lambda: check_pope(vlm, args.pope_images, args.batch_size)}
    for name, run in sections.items():
        start = time.perf_counter()
        report[name] = run()
        report[name]["section_s"] = time.perf_counter() - start
        print(f"{name}: " + json.dumps(report[name], default=str), flush=True)
    if not args.no_fp16 and dtype != torch.float32:
        vlm.model.half()
        clean, corrupt = pair(vlm, args.seed)
        report["self_check_fp16"] = self_check_margin(vlm, corrupt)
        print("self_check_fp16: " + json.dumps(report["self_check_fp16"]), flush=True)
    report["total_s"] = time.perf_counter() - t0
    t = report["trace"]
    print(f"\n{report['device']}, {report['dtype']}, {report['parameters_billions']:.2f} B parameters, "
          f"{t['tokens']} tokens: engine {t['engine_vs_loop']:.1f}x faster than one forward per cell (layers "
          f"{t['traced_layers']} traced, a stride of {stride}, extrapolated to all {t['full_grid_cells']} cells; "
          f"loop timed on {t['loop_cells_timed']} seeded cells); batched POPE {report['pope']['batched_vs_one']:.1f}x; "
          f"total {report['total_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
