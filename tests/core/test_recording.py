"""``segquant.recording.record_linears``: the one way SegQuant hooks the inputs and outputs of Linear layers."""

import pytest
import torch
from torch import nn

from segquant.recording import record_linears


class Toy(nn.Module):
    """Two Linear layers, the second one called twice, and a Linear subclass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.down = nn.Linear(8, 4)
        self.head = type("MyLinear", (nn.Linear,), {})(4, 2)

    def forward(self, x):
        h = self.down(self.act(self.up(x)))
        return self.head(self.down(self.act(self.up(h))))


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_records_every_call_of_every_linear_in_order():
    model, x = Toy(), torch.randn(3, 4)
    with record_linears(model, outputs=True) as rec, torch.no_grad():
        y = model(x)
    assert list(rec.inputs) == ["up", "down", "head"]  # first-call order; the subclass is a Linear too
    assert [len(v) for v in rec.inputs.values()] == [2, 2, 1] and rec.inputs.keys() == rec.outputs.keys()
    torch.testing.assert_close(rec.inputs["up"][0], x)
    torch.testing.assert_close(rec.outputs["head"][0], y)
    torch.testing.assert_close(rec.outputs["down"][0], model.down(rec.inputs["down"][0]))
    first = rec.first()
    assert first["up"][0] is rec.inputs["up"][0] and first["up"][1] is rec.outputs["up"][0]


def test_inputs_only_by_default_and_detached():
    model = Toy()
    with record_linears(model) as rec:
        model(torch.randn(2, 4, requires_grad=True))
    assert rec.outputs == {} and rec.first()["down"][1] is None
    assert not any(t.requires_grad for ts in rec.inputs.values() for t in ts)


def test_names_filter_and_transform():
    model = Toy()
    with record_linears(model, names=["down", "not_a_layer"], outputs=True,
                        transform=lambda t: t.reshape(-1, t.shape[-1])[:1].clone()) as rec:
        model(torch.randn(2, 5, 4))
    assert list(rec.inputs) == ["down"] and list(rec.outputs) == ["down"]
    assert rec.inputs["down"][0].shape == (1, 8) and rec.outputs["down"][0].shape == (1, 4)
    with record_linears(model, names=[]) as rec:
        model(torch.randn(2, 4))
    assert rec.inputs == {}


def test_keep_false_only_calls_on_input():
    model, seen = Toy(), []
    with record_linears(model, keep=False, outputs=True, on_input=lambda name, x: seen.append((name, x.shape))) as rec:
        model(torch.randn(3, 4))
    assert rec.inputs == {} and rec.outputs == {}
    assert seen == [("up", (3, 4)), ("down", (3, 8)), ("up", (3, 4)), ("down", (3, 8)), ("head", (3, 4))]


def test_hooks_are_removed_on_exit_and_on_error():
    model = Toy()
    before = hook_count(model)
    with record_linears(model, outputs=True, on_input=lambda n, x: None):
        assert hook_count(model) == before + 6  # a pre-hook and a forward hook on each of the 3 layers
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with record_linears(model, outputs=True):
            raise RuntimeError("boom")
    assert hook_count(model) == before

    def fail(name, x):
        raise ValueError(f"{name} rejected")

    with pytest.raises(ValueError, match="up rejected"):
        with record_linears(model, on_input=fail):
            model(torch.randn(1, 4))
    assert hook_count(model) == before
    with record_linears(model) as rec:  # recording after an error starts empty
        model(torch.randn(1, 4))
    assert [len(v) for v in rec.inputs.values()] == [2, 2, 1]
