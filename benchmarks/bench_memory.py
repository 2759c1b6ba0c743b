"""A sweep's peak memory against the bound the tracing engine planned, for a long sequence, in one run.

Builds a random LLaVA whose image gives a long LM sequence, traces one component at every
layer and token, and reports: the engine's plan (rows per batch x estimated bytes per row,
``vlm_interp.tracing.memory.planned_bytes``), the state the fast path records once (each
layer's input, keys and values), and the peak measured during the sweep. On a GPU the peak is
``torch.cuda.max_memory_allocated`` above what was allocated before; on CPU it is the peak of
the bytes the sweep allocates, read from the PyTorch profiler's allocator events.

    python benchmarks/bench_memory.py                          # CPU, a 270-token sequence
    python benchmarks/bench_memory.py --device cuda --image-size 336 --layers 8 --width 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from vlm_interp.corruptions import noise
from vlm_interp.tracing import fast, trace
from vlm_interp.tracing.memory import planned_bytes

GiB = 2 ** 30


def peak_bytes(run, device: torch.device) -> tuple[int, object]:
    """(peak bytes allocated while ``run()`` ran, above what was allocated before; its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        events = json.loads((Path(tmp) / "trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e["args"].get("Device Type", 0) == 0]  # the profiler counts from its start
    return (max(totals) if totals else 0), result


def state_bytes(state: fast.LMStart | None) -> int:
    """Bytes of what the fast path records once: every layer's input and its keys and values."""
    if state is None:
        return 0
    tensors = [x.hidden for x in state.inputs] + [t for x in state.inputs if x.kv for t in x.kv]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(vlm, image, question: str, component: str, batch_size) -> dict:
    """Plan, recorded state and measured peak of a ``component`` x layer x token sweep on one example."""
    clean = vlm.prepare(image, question, answer="yes")
    corrupt = noise(vlm, clean, scale="3sd", tokens="image", seed=0)
    n_cells = vlm.adapter.n_layers["lm"] * clean.n_tokens
    state, why = fast.lm_start(vlm, corrupt)
    plan = planned_bytes(vlm, corrupt, batch_size, n_cells, state)
    start = time.perf_counter()
    peak, _ = peak_bytes(lambda: trace(vlm, clean, corrupt, components=[f"lm.{component}"], tokens="each",
                                       batch_size=plan["rows"], progress=False), vlm.device)
    return {"tokens": clean.n_tokens, "cells": n_cells, "rows": plan["rows"], "row_bytes": plan["row_bytes"],
            "planned_bound": plan["bound"], "recorded_state": state_bytes(state), "peak": peak,
            "fast_path": why or "applies", "seconds": time.perf_counter() - start}


def report(label: str, m: dict) -> None:
    planned = m["planned_bound"] + m["recorded_state"]
    print(f"{label}: {m['tokens']} tokens, {m['cells']} cells, {m['rows']} rows per batch "
          f"(fast path: {m['fast_path']})\n"
          f"  planned bound   {m['planned_bound'] / GiB:8.3f} GiB ({m['rows']} x {m['row_bytes'] / 2 ** 20:.1f} MiB)\n"
          f"  recorded state  {m['recorded_state'] / GiB:8.3f} GiB\n"
          f"  measured peak   {m['peak'] / GiB:8.3f} GiB = {m['peak'] / max(1, planned):.2f} x (bound + state)"
          f"   [{m['seconds']:.1f} s]", flush=True)


def main(argv: list[str] | None = None) -> dict:
    from bench_trace import random_llava

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=128, help="image side; (side / 8)^2 image tokens")
    ap.add_argument("--component", default="mlp")
    ap.add_argument("--batch-size", default="auto", help="rows per batch, or auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    vlm, image, question = random_llava(args.layers, args.width, args.image_size, seed=0)
    vlm.model.to(device=args.device, dtype=getattr(torch, args.dtype))
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    result = measure(vlm, image, question, args.component, batch)
    report(f"random LLaVA {args.layers}x{args.width} on {args.device} ({args.dtype})", result)
    return result


if __name__ == "__main__":
    main()
