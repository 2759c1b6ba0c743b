"""The hook engine on small modules and on real transformers models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers.utils import ModelOutput

from vlm_interp.errors import HookNeverFiredError, ModuleNotFoundInModelError, UnsupportedOutputError
from vlm_interp.hooks import AttachedHooks, Hook, capture, edit
from vlm_interp.tiny import tiny

from conftest import QUESTION


@dataclass
class Out(ModelOutput):
    hidden: torch.Tensor | None = None
    extra: torch.Tensor | None = None


class Returns(nn.Module):
    """Returns its input doubled, wrapped in the container type under test."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        y = x * 2
        if self.kind == "tensor":
            return y
        if self.kind == "tuple":
            return (y, torch.zeros(1))
        if self.kind == "list":
            return [y, torch.zeros(1)]
        return Out(hidden=y, extra=torch.zeros(1))


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.inner = Returns(kind)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        out = self.inner(x)
        y = out if isinstance(out, torch.Tensor) else out[0]
        return self.lin(y)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "modeloutput"])
def test_edit_output_of_every_container_type(kind):
    net = Net(kind)
    x = torch.randn(2, 3)
    base = net(x)
    with edit(net, {"inner": lambda t: t + 1.0}) as hooks:
        edited = net(x)
    assert hooks["inner"].calls == 1
    torch.testing.assert_close(edited, net.lin(x * 2 + 1.0), rtol=0, atol=0)
    torch.testing.assert_close(net(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["tuple", "list", "modeloutput"])
def test_edit_keeps_container_type_and_other_fields(kind):
    mod = Returns(kind)
    with edit(mod, {"": lambda t: t * 0}):
        out = mod(torch.ones(2))
    assert type(out).__name__ == {"tuple": "tuple", "list": "list", "modeloutput": "Out"}[kind]
    assert torch.equal(out[0], torch.zeros(2)) and torch.equal(out[1], torch.zeros(1))


def test_edit_input_positional_and_keyword():
    lin = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    with AttachedHooks(lin, [Hook("", fn=lambda t: t * 0, kind="input")]):
        assert torch.allclose(lin(x), lin.bias.expand(4, 3))

    class KwOnly(nn.Module):
        def forward(self, *, hidden_states):
            return hidden_states + 1

    m = KwOnly()
    with AttachedHooks(m, [Hook("", fn=lambda t: t * 3, kind="input")]):
        assert torch.equal(m(hidden_states=torch.ones(2)), torch.full((2,), 4.0))


def test_input_hook_without_tensor_argument_is_a_clear_error():
    class Weird(nn.Module):
        def forward(self, *, values):
            return values

    weird = Weird()
    with pytest.raises(UnsupportedOutputError, match="'hidden_states'"):
        with AttachedHooks(weird, [Hook("", fn=lambda t: t, kind="input")]):
            weird(values=torch.ones(1))


def test_unsupported_output_and_bad_edits_are_errors():
    class Dicty(nn.Module):
        def forward(self, x):
            return {"a": x}

    d = Dicty()
    with pytest.raises(UnsupportedOutputError, match="dict, which has no tensor in first place"):
        with edit(d, {"": lambda t: t}):
            d(torch.ones(1))
    lin = nn.Linear(2, 2)
    with pytest.raises(UnsupportedOutputError, match="changed the shape"):
        with edit(lin, {"": lambda t: t[:, :1]}):
            lin(torch.ones(1, 2))
    with pytest.raises(UnsupportedOutputError, match="returned int"):
        with edit(lin, {"": lambda t: 3}):
            lin(torch.ones(1, 2))


def test_capture_detached_or_with_grad_and_edit_plus_capture():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with capture(lin, [""]) as hooks:
        y = lin(x)
    assert torch.equal(hooks[""].value, y) and not hooks[""].value.requires_grad
    with capture(lin, [""], grad=True) as hooks:
        y = lin(x)
    hooks[""].value.sum().backward()
    assert lin.weight.grad is not None
    both = Hook("", fn=lambda t: t * 0, capture=True)
    with AttachedHooks(lin, [both]):
        lin(x)
    assert torch.equal(both.value, torch.zeros(2, 3))  # capture sees what flows on


def test_channels_select_a_slice_for_edit_and_capture():
    lin = nn.Linear(4, 4)
    x = torch.arange(8.0).reshape(2, 4)
    hook = Hook("", fn=lambda t: t * 10, kind="input", capture=True, channels=slice(2, 4))
    with AttachedHooks(lin, [hook]):
        y = lin(x)
    manual = x.clone()
    manual[:, 2:] *= 10
    torch.testing.assert_close(y, lin(manual), rtol=0, atol=0)
    assert torch.equal(hook.value, manual[:, 2:])


def test_hooks_removed_after_exception_and_never_fired_raises():
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with edit(lin, {"": lambda t: t}):
            raise RuntimeError("boom")
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    with pytest.raises(HookNeverFiredError, match="never fired"):
        with edit(lin, {"": lambda t: t}):
            pass
    assert not lin._forward_hooks
    with AttachedHooks(lin, [Hook("", fn=lambda t: t, allow_unused=True)]):
        pass  # opted out: no error


def test_missing_module_is_a_clear_error_and_nothing_is_attached():
    net = Net("tensor")
    with pytest.raises(ModuleNotFoundInModelError, match="does not exist"):
        with AttachedHooks(net, [Hook("lin", fn=lambda t: t), Hook("nope", fn=lambda t: t)]):
            pass
    assert not net.lin._forward_hooks


def test_hook_that_neither_edits_nor_captures_is_rejected():
    with pytest.raises(ValueError, match="would do nothing"):
        Hook("x")


def test_real_llama_output_types_are_handled_without_guessing():
    """transformers 5.x: a Llama decoder layer returns a tensor, its self-attention a tuple."""
    model, processor = tiny("llava")
    layer = "model.language_model.layers.0"
    types = {}

    def observer(path):
        def record(module, args, output):
            types.setdefault(path, type(output))

        return record

    handles = [model.get_submodule(p).register_forward_hook(observer(p)) for p in (layer, layer + ".self_attn")]
    inputs = processor(images=torch.zeros(3, 32, 32), text="USER: <image>\n" + QUESTION + " ASSISTANT:",
                       return_tensors="pt")
    with torch.no_grad():
        base = model(**inputs).logits
        with edit(model, {layer: lambda t: t + 1, layer + ".self_attn": lambda t: t * 0}) as hooks:
            edited = model(**inputs).logits
    for h in handles:
        h.remove()
    assert types[layer] is torch.Tensor and types[layer + ".self_attn"] is tuple
    assert all(h.calls == 1 for h in hooks.values())
    assert not torch.allclose(base, edited)


def test_transformers_own_hooks_survive_and_plain_forward_is_unchanged():
    """transformers installs output-capturing hooks on the CLIP tower; we must remove only ours."""
    model, processor = tiny("llava")
    inputs = processor(images=torch.zeros(3, 32, 32), text="USER: <image>\n" + QUESTION + " ASSISTANT:",
                       return_tensors="pt")

    def hook_table():
        return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}

    with torch.no_grad():
        base = model(**inputs).logits
    theirs = hook_table()
    assert any(v[0] for v in theirs.values()), "expected transformers to install hooks of its own"
    vision_layer = "model.vision_tower.encoder.layers.0"
    with torch.no_grad(), edit(model, {vision_layer: lambda t: t * 3, vision_layer + ".self_attn": lambda t: -t}):
        edited = model(**inputs).logits
    assert not torch.allclose(base, edited)
    assert hook_table() == theirs
    with torch.no_grad():
        again = model(**inputs).logits
    torch.testing.assert_close(again, base, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_edit_reaches_the_vision_layer_that_transformers_records(family):
    """LLaVA reads image features from hidden states that transformers records through its own hooks,
    installed at the first forward; an edit of that layer must be what gets recorded."""
    import vlm_interp as vi

    vlm = vi.wrap(*tiny(family, seed=0))
    ex = vlm.prepare(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), QUESTION)
    with torch.no_grad():
        base = vlm.logits(ex.inputs)  # the first forward installs transformers' hooks
    read = vlm.model.config.vision_feature_layer
    layer = read % vlm.adapter.n_layers["vision"] if read < 0 else read - 1  # hidden_states[0] is the embedding
    order = []
    with torch.no_grad(), vlm.attach([vlm.hook(f"vision.hidden.{layer}", lambda t: order.append("first") or t + 5.0),
                                     vlm.hook(f"vision.hidden.{layer}", lambda t: order.append("second") or t)]):
        edited = vlm.logits(ex.inputs)
    assert order == ["first", "second"]
    assert not torch.allclose(base, edited), f"the edit of vision layer {layer} never reached the LM"
    order.clear()  # nested contexts: the outer (earlier) context's hook still runs first
    with torch.no_grad(), vlm.attach([vlm.hook(f"vision.hidden.{layer}", lambda t: order.append("outer") or t + 5.0)]):
        with vlm.attach([vlm.hook(f"vision.hidden.{layer}", lambda t: order.append("inner") or t)]):
            nested = vlm.logits(ex.inputs)
    assert order == ["outer", "inner"]
    torch.testing.assert_close(nested, edited, rtol=0, atol=0)


class _Tiles(torch.nn.Module):
    """A model whose submodule sees each example's 3 tiles of 2 positions along its batch axis."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, input_ids):
        rows = input_ids.shape[0]
        tiles = torch.arange(rows * 3 * 2 * 4, dtype=torch.float).reshape(rows * 3, 2, 4)
        return self.inner(tiles)


def test_fold_shows_each_examples_tiles_as_one_sequence():
    model = _Tiles()
    with torch.no_grad():
        plain = model(torch.zeros(2, 5, dtype=torch.long))
    grab = Hook("inner", capture=True, fold=True)

    def zero_tile_1_position_1(t):
        assert t.shape == (2, 6, 4)  # 2 examples, 3 tiles x 2 positions
        t = t.clone()
        t[:, 3] = 0.0
        return t

    edit = Hook("inner", fn=zero_tile_1_position_1, fold=True)
    with torch.no_grad(), AttachedHooks(model, [edit, grab]):
        out = model(torch.zeros(2, 5, dtype=torch.long))
    expected = plain.clone()
    expected[1::3, 1] = 0.0  # tile 1 of each example, its position 1
    assert torch.equal(out, expected)
    assert torch.equal(grab.value, expected.reshape(2, 6, 4))  # the capture sees the edited tensor, folded
    direct = Hook("inner", capture=True, fold=True)
    with torch.no_grad(), AttachedHooks(model, [direct]):
        model.inner(torch.zeros(6, 2, 4))  # called on its own: one example
    assert direct.value.shape == (1, 12, 4)
    graded = Hook("inner", capture=True, grad=True, fold=True)
    with AttachedHooks(model, [graded]):
        total = model(torch.zeros(1, 5, dtype=torch.long)).sum()
        (grad,) = torch.autograd.grad(total, [graded.value])
    assert grad.shape == (1, 6, 4) and torch.equal(grad, torch.ones_like(grad))
