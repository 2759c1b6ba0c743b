"""The fast tracing path (runs that start inside the LM) against a plain loop, its fallbacks, and auto batch size."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import QUESTION, STRICT_TRANSFORMERS

import vlm_interp as vi
from vlm_interp.adapters.base import Replay
from vlm_interp.corruptions import InputEdit, applied, noise
from vlm_interp.sites import Site
from vlm_interp.tiny import tiny
from vlm_interp.tracing import engine, fast, memory, trace
from vlm_interp.tracing.engine import Cell, run_cells, site_activations
from vlm_interp.tracing.metrics import make_metric

pytestmark = STRICT_TRANSFORMERS

# Qwen3-VL: M-RoPE positions, and DeepStack features added between LM layers
CAUSAL = ("llava", "llava_next", "blip2", "instructblip", "qwen3_vl")
LM_HEAD = {"llava": "lm_head", "llava_next": "lm_head", "blip2": "language_model.lm_head",
           "instructblip": "language_model.lm_head", "qwen2_vl": "lm_head", "qwen2_5_vl": "lm_head",
           "qwen3_vl": "lm_head"}


def sharp(family: str) -> vi.VLM:
    """A tiny model whose LM head is scaled up, so that restoring one cell moves the answer visibly."""
    vlm = vi.wrap(*tiny(family, seed=0))
    if family in LM_HEAD:
        with torch.no_grad():
            vlm.model.get_submodule(LM_HEAD[family]).weight.mul_(40.0)
    return vlm


@pytest.fixture(scope="module", params=CAUSAL)
def causal(request) -> vi.VLM:
    return sharp(request.param)


def plain_value(vlm, clean, corrupt, site: Site, positions, answer_id: int) -> float:
    """log P(answer) with one site restored at ``positions``: raw torch hooks, one whole forward, edits applied."""
    _, kind = vlm.adapter.adapter.towers[site.tower].components[site.component]
    module = vlm.model.get_submodule(vlm.adapter.module_path(site.tower, site.component, site.layer))
    width = None
    store = []

    def grab(m, a, o):
        store.append((o if torch.is_tensor(o) else o[0]).detach().clone())

    def grab_in(m, a, kw):
        store.append((a[0] if a else kw["hidden_states"]).detach().clone())

    handle = module.register_forward_pre_hook(grab_in, with_kwargs=True) if kind == "input" else \
        module.register_forward_hook(grab)
    try:
        with torch.no_grad(), applied(vlm, clean):
            vlm.logits(clean.inputs)
    finally:
        handle.remove()
    src = store[0]
    if site.head is not None:
        width = src.shape[-1] // vlm.adapter.n_heads[site.tower]
    cols = slice(None) if width is None else slice(site.head * width, (site.head + 1) * width)

    def patch(t):
        t = t.clone()
        t[:, list(positions), cols] = src[:, list(positions), cols]
        return t

    if kind == "input":
        handle = module.register_forward_pre_hook(lambda m, a, kw: ((patch(a[0]), *a[1:]), kw), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, a, o: patch(o) if torch.is_tensor(o) else (patch(o[0]), *o[1:]))
    try:
        with torch.no_grad(), applied(vlm, corrupt):
            logits = vlm.logits(corrupt.inputs)
    finally:
        handle.remove()
    return float(torch.log_softmax(logits[0, vlm.answer_start(corrupt)].float(), -1)[answer_id])


def pair(vlm, image, noised: bool = True):
    """A clean example and its corruption (noise on the image embeddings, an in-model edit, by default)."""
    clean = vlm.prepare(image, QUESTION, answer="yes")
    return clean, noise(vlm, clean, scale=3.0, tokens="image", seed=0) if noised else clean


def test_fast_path_equals_plain_loop_with_noise_edits(causal, image):
    """Every LM component (also the layers' inputs) at every layer and position, noise edits honoured, against one
    forward per cell, at batch sizes 1, 2 and "auto"; key/value reuse is on."""
    vlm = causal
    clean, corrupt = pair(vlm, image)
    state, why = fast.lm_start(vlm, corrupt)
    assert state is not None and state.kv_reuse, why or state.why_no_kv
    answer_id = vlm.encode_answer(clean, "yes")[0]
    components = ("input", "hidden", "attn", "mlp")
    n_layers, positions = vlm.adapter.n_layers["lm"], [[p] for p in range(clean.n_tokens)]
    expected = np.array([[[plain_value(vlm, clean, corrupt, Site("lm", comp, layer), pos, answer_id)
                           for pos in positions] for layer in range(n_layers)] for comp in components])
    assert float(np.std(expected)) > 1e-2  # the comparison below is not trivially passed
    for batch_size in (1, 2, "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", engine.FastPathWarning)  # the fast path runs, it does not fall back
            tr = trace(vlm, clean, corrupt, components=[f"lm.{c}" for c in components], tokens="each",
                       batch_size=batch_size, metric="logprob", progress=False)
        assert tr.attrs["positions"] == positions
        np.testing.assert_allclose(tr.data.values, expected, atol=1e-4, rtol=0, err_msg=f"batch_size={batch_size}")


def test_fast_heads_and_groups_equal_plain_loop(causal, image):
    vlm = causal
    clean, corrupt = pair(vlm, image)
    answer_id = vlm.encode_answer(clean, "yes")[0]
    tr = trace(vlm, clean, corrupt, components=["lm.head"], tokens=["image", "question", "last"], metric="logprob",
               progress=False)
    assert float(np.nanstd(tr.data.values)) > 1e-3
    for layer in range(vlm.adapter.n_layers["lm"]):
        for head in range(vlm.adapter.n_heads["lm"]):
            for k, pos in enumerate(tr.attrs["positions"]):
                expected = plain_value(vlm, clean, corrupt, Site("lm", "head", layer, head), pos, answer_id)
                got = float(tr.data.sel(component="head", layer=layer, head=head, position=k))
                assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_fast_equals_general_path_for_windows_and_noising(family, image, other_image):
    vlm = sharp(family)
    clean = vlm.prepare(image, QUESTION, answer="yes")
    corrupt = vlm.prepare(other_image, QUESTION, answer="yes")
    m = make_metric(vlm, clean, "logit_diff", other="no")
    for base, src_ex in ((corrupt, clean), (clean, corrupt)):  # restoring and noising directions
        cells = [Cell(tuple(Site("lm", c, l) for l in span), (p,)) for c in ("mlp", "attn")
                 for span in ([0, 1], [1]) for p in range(clean.n_tokens)]
        cells += [Cell((Site("lm", "hidden", 0), Site("vision", "hidden", 1)), (1, 2))]  # mixed towers: general path
        source = site_activations(vlm, src_ex, {s for c in cells for s in c.sites})
        quick = run_cells(vlm, base, source, cells, m, batch_size=4, progress=False)
        whole = run_cells(vlm, base, source, cells, m, batch_size=4, progress=False, fast_path=False)
        assert float(whole.std()) > 1e-3
        torch.testing.assert_close(quick, whole, atol=1e-4, rtol=0)


def test_fast_path_runs_the_vision_tower_once(image):
    vlm = sharp("llava")
    clean, corrupt = pair(vlm, image)
    counts = []
    for batch_size in (3, 1):
        calls = []
        handle = vlm.model.get_submodule("model.vision_tower").register_forward_hook(lambda *a: calls.append(1))
        try:
            trace(vlm, clean, corrupt, components=["lm.hidden", "lm.mlp"], tokens="each", batch_size=batch_size,
                  progress=False)
        finally:
            handle.remove()
        counts.append(len(calls))
    # score clean and corrupted, capture the source, record the base run, and the self-check's two perturbed
    # whole-model references (at least): nothing per batch
    assert counts[0] == counts[1] and 6 <= counts[0] <= 4 + 2 * 4


def test_eager_attention_uses_the_recorded_mask(image):
    """With eager attention the model passes a materialised mask; restarting at a position slices it."""
    vlm = sharp("llava")
    vlm.model.set_attn_implementation("eager")
    clean, corrupt = pair(vlm, image)
    state, _ = fast.lm_start(vlm, corrupt)
    assert state is not None and state.kv_reuse
    assert torch.is_tensor(state.inputs[0].kwargs["attention_mask"])
    m = make_metric(vlm, clean)
    cells = [Cell((Site("lm", "attn", l),), (p,)) for l in range(2) for p in range(clean.n_tokens)]
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    torch.testing.assert_close(run_cells(vlm, corrupt, source, cells, m, progress=False),
                               run_cells(vlm, corrupt, source, cells, m, progress=False, fast_path=False),
                               atol=1e-5, rtol=0)


def test_fallbacks_are_automatic(image, monkeypatch):
    blip = vi.wrap(*tiny("blip", seed=0))
    ex = blip.prepare(image, QUESTION, answer="yes")
    start, reason = fast.lm_start(blip, ex)
    assert start is None and reason.startswith("the blip answer tower is not a decoder LM continuing the prompt")
    vlm = sharp("llava")
    clean, corrupt = pair(vlm, image)
    inside = corrupt.derive(edits=[InputEdit("model.language_model.layers.1.mlp", "output", (3,),
                                             torch.ones(1, 1, 32), clean.n_tokens)])
    state, why = fast.lm_start(vlm, inside)
    assert state is None and "inside or after the LM layers" in why
    # an edit at the first layer's input is recorded (LLaVA-NeXT puts its embedding noise there)
    first = corrupt.derive(edits=[InputEdit("model.language_model.layers.0", "input", (3,),
                                            torch.ones(1, 1, 32), clean.n_tokens)])
    assert fast.lm_start(vlm, first)[0] is not None
    # a failed self-check falls back with a warning that names it, and results stay those of the general path
    monkeypatch.setattr(fast, "self_check", lambda *a: "the self-check failed on purpose")
    assert fast.lm_start(vlm, corrupt) == (None, "the self-check failed on purpose")
    m = make_metric(vlm, clean)
    cells = [Cell((Site("lm", "mlp", 1),), (p,)) for p in range(4)]
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    with pytest.warns(engine.FastPathWarning, match="failed on purpose"):
        fallback = run_cells(vlm, corrupt, source, cells, m, progress=False)
    with pytest.raises(engine.FastPathError, match="failed on purpose"):
        run_cells(vlm, corrupt, source, cells, m, progress=False, fast_path=True)
    monkeypatch.undo()
    torch.testing.assert_close(fallback, run_cells(vlm, corrupt, source, cells, m, progress=False, fast_path=True),
                               atol=1e-5, rtol=0)


class Marker:
    """An object a decoder layer receives as a keyword, which the fast path has no replay rule for."""


def test_an_unknown_layer_keyword_falls_back_with_a_warning_and_the_loops_numbers(image):
    """transformers passes a model's extra keywords down to its decoder layers; one the adapter's replay table does
    not list makes the fast path decline with the keyword's name, and tracing gives the plain loop's numbers."""
    vlm = sharp("llava")
    clean, corrupt = pair(vlm, image)
    odd = corrupt.derive(inputs={**corrupt.inputs, "marker": Marker()})
    state, why = fast.lm_start(vlm, odd)
    assert state is None and "'marker'" in why and "Marker" in why
    answer_id = vlm.encode_answer(clean, "yes")[0]
    with pytest.warns(engine.FastPathWarning, match="'marker'"):
        tr = trace(vlm, clean, odd, components=["lm.mlp", "lm.input"], tokens="each", metric="logprob",
                   batch_size=2, progress=False)
    expected = np.array([[[plain_value(vlm, clean, corrupt, Site("lm", comp, layer), [p], answer_id)
                           for p in range(clean.n_tokens)] for layer in range(2)] for comp in ("mlp", "input")])
    assert float(np.std(expected)) > 1e-2
    np.testing.assert_allclose(tr.data.values, expected, atol=1e-4, rtol=0)
    with pytest.raises(engine.FastPathError, match="'marker'"):
        trace(vlm, clean, odd, components=["lm.mlp"], tokens=["last"], progress=False, fast_path=True)
    with pytest.raises(engine.FastPathError, match="vision.mlp.0"):
        trace(vlm, clean, corrupt, components=["vision.mlp"], tokens=["image"], progress=False, fast_path=True)


def test_the_self_check_fails_on_wrong_replays(image):
    """Replays that are wrong only for patched rows, or only after a restart, fail the self-check: the base run's own
    live cache replayed into the layers (transformers 5.24's renamed cache keyword did this), and rotary positions
    off by one."""
    from transformers import DynamicCache

    vlm = sharp("llava")
    _, corrupt = pair(vlm, image)
    state, why = fast.lm_start(vlm, corrupt)
    assert state is not None and state.kv_reuse, why
    checks, why = fast.probes(vlm, corrupt, state)
    assert len(checks) == 2 and not why
    later = fast.probe_position(corrupt, state)  # where the self-check perturbs and restarts
    assert fast.self_check(vlm, state, checks, 0) == "" and fast.self_check(vlm, state, checks, later) == ""
    # stale: the layers read the base run's own cache under their keyword, the fresh one goes to a keyword they ignore
    stale = DynamicCache()
    for j, x in enumerate(state.inputs[:-1]):
        stale.update(*x.kv, j)
    key = state.cache_key
    for x in state.inputs[:-1]:
        x.kwargs[key] = stale
    state.replay, state.cache_key = {**state.replay, key: Replay("constant")}, "ignored_cache"
    assert fast._guarded_check(vlm, state, checks, 0) != ""
    for x in state.inputs[:-1]:
        del x.kwargs[key]
    state.cache_key = key
    assert fast.self_check(vlm, state, checks, 0) == ""
    # rotary embeddings of the next position: a wrong replay for every row
    cos, sin = state.inputs[0].kwargs["position_embeddings"]
    for x in state.inputs[:-1]:
        x.kwargs["position_embeddings"] = (cos.roll(1, dims=1), sin.roll(1, dims=1))
    assert "does not reproduce" in fast.self_check(vlm, state, checks, 0)


def test_an_error_in_a_fast_batch_falls_back_with_a_warning(image, monkeypatch):
    """Any exception but running out of memory inside a fast batch: its cells are recomputed by whole-model forwards,
    with a warning naming the error; with fast_path=True the error propagates; out of memory always propagates."""
    vlm = sharp("llava")
    clean, corrupt = pair(vlm, image)
    m = make_metric(vlm, clean, "logprob")
    cells = [Cell((Site("lm", "mlp", l),), (p,)) for l in range(2) for p in range(clean.n_tokens)]
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    general = run_cells(vlm, corrupt, source, cells, m, progress=False, fast_path=False)
    assert float(general.std()) > 1e-3
    calls = []

    def broken(self, rows, *args, **kw):
        calls.append(rows)
        if len(calls) > 1:  # the first batch succeeds: its values are recomputed too, and must not be mixed in wrong
            raise RuntimeError("a replay went wrong on purpose")
        return real(self, rows, *args, **kw)

    real = fast.LMStart.logits
    checked = fast.lm_start(vlm, corrupt)[0]  # the self-check runs before the patch: only the batches break
    monkeypatch.setattr(fast, "lm_start", lambda *a: (checked, ""))
    monkeypatch.setattr(fast.LMStart, "logits", broken)
    with pytest.warns(engine.FastPathWarning, match="RuntimeError: a replay went wrong on purpose"):
        fallback = run_cells(vlm, corrupt, source, cells, m, batch_size=4, progress=True)
    torch.testing.assert_close(fallback, general, atol=1e-5, rtol=0)
    calls.clear()
    with pytest.raises(RuntimeError, match="on purpose"):
        run_cells(vlm, corrupt, source, cells, m, batch_size=4, progress=False, fast_path=True)

    def out_of_memory(self, *a, **kw):
        raise torch.OutOfMemoryError("no memory left")

    monkeypatch.setattr(fast.LMStart, "logits", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_cells(vlm, corrupt, source, cells, m, batch_size=4, progress=False)


def test_kv_reuse_can_be_off_without_changing_results(image):
    vlm = sharp("instructblip")
    _, corrupt = pair(vlm, image)
    state, _ = fast.lm_start(vlm, corrupt)
    with torch.no_grad():
        reused = state.logits(1, 1, 5)
        state.kv_reuse = False
        full = state.logits(1, 1, 5)
    torch.testing.assert_close(reused, full, atol=1e-4, rtol=0)
    assert state.start_position(5) == 0


def test_auto_batch_size_follows_free_memory(image, monkeypatch):
    vlm = sharp("llava")
    clean, corrupt = pair(vlm, image)
    state, _ = fast.lm_start(vlm, corrupt)
    per_row_fast = engine.row_bytes(vlm, corrupt, state)
    per_row = engine.row_bytes(vlm, corrupt)
    assert per_row > per_row_fast > 0  # a run from inside the LM holds less than a whole-model run
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 ** 12)
    assert engine.auto_batch_size(vlm, corrupt, 1000) == engine.MAX_AUTO_BATCH
    assert engine.auto_batch_size(vlm, corrupt, 5) == 5  # never more rows than cells
    monkeypatch.setattr(memory, "available_memory", lambda device: int(per_row * 3 / engine.MEMORY_FRACTION))
    assert engine.auto_batch_size(vlm, corrupt, 1000) == 3
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    assert engine.auto_batch_size(vlm, corrupt, 1000) == 1
    monkeypatch.setattr(memory, "available_memory", lambda device: None)
    assert engine.auto_batch_size(vlm, corrupt, 1000) == engine.FALLBACK_BATCH
    # a tiny budget still traces, one cell per forward
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    small = trace(vlm, clean, corrupt, components=["lm.mlp"], tokens=["image", "last"], progress=False)
    monkeypatch.undo()
    big = trace(vlm, clean, corrupt, components=["lm.mlp"], tokens=["image", "last"], batch_size=64, progress=False)
    np.testing.assert_allclose(small.data.values, big.data.values, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        trace(vlm, clean, corrupt, components=["lm.mlp"], batch_size=0, progress=False)


def test_available_memory_reads_the_system():
    free = engine.available_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_shapes_llava_fast_path_matches_general_path():
    """On the trained organism (real signal), the fast path gives the whole-model results."""
    from vlm_interp.zoo.organisms import ORGANISM_WORLD
    from vlm_interp.zoo.shapes import World
    from vlm_interp.zoo.tasks import existence_question

    vlm = vi.load("zoo:shapes-llava")
    scene = World(ORGANISM_WORLD).scene(1)
    clean = vlm.prepare(scene.pil(), existence_question(scene.objects[0].shape), answer="yes")
    corrupt = noise(vlm, clean, scale="3sd", tokens="image", place="patches", seed=0)
    m = make_metric(vlm, clean)
    positions = sorted(set(clean.positions("image")[::7] + clean.positions("question") + clean.positions("last")))
    cells = [Cell((Site("lm", c, l),), (p,)) for c in ("hidden", "attn", "mlp") for l in range(4) for p in positions]
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    quick = run_cells(vlm, corrupt, source, cells, m, progress=False)
    whole = run_cells(vlm, corrupt, source, cells, m, progress=False, fast_path=False)
    assert float(quick.max() - quick.min()) > 0.05
    torch.testing.assert_close(quick, whole, atol=1e-5, rtol=0)


def test_the_trace_command_forces_either_path(tmp_path, monkeypatch):
    """`vlm-interp trace --path fast|general` take the path asked for (counted at the engine), with equal numbers;
    `--path fast` errors where the fast path cannot apply (BLIP's answer decoder)."""
    from vlm_interp.cli import main
    from vlm_interp.tracing import Trace

    used = []
    real_whole, real_fast = engine._run_whole, engine._run_from_lm
    monkeypatch.setattr(engine, "_run_whole", lambda *a: used.append("general") or real_whole(*a))
    monkeypatch.setattr(engine, "_run_from_lm", lambda *a: used.append("fast") or real_fast(*a))
    args = ["trace", "--model", "tiny:llava", "--image", "shapes:3", "--question", "Is there a circle in the image?",
            "--answer", "yes", "--tokens", "image,question,last", "--components", "mlp,attn"]
    values = {}
    for path in ("fast", "general"):
        used.clear()
        assert main(args + ["--path", path, "--out", str(tmp_path / path)]) == 0
        assert set(used) == {path}
        values[path] = Trace.load(tmp_path / path / "trace.json").data.values
    assert float(np.nanstd(values["general"])) > 0
    np.testing.assert_allclose(values["fast"], values["general"], atol=1e-5, rtol=0)
    with pytest.raises(engine.FastPathError, match="not a decoder LM continuing the prompt"):
        main(["trace", "--model", "tiny:blip", "--image", "shapes:3", "--question", "Is there a circle in the image?",
              "--answer", "yes", "--path", "fast", "--out", str(tmp_path / "blip")])
