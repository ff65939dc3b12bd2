"""facetool.hooks: taps and set-and-restore leave the model exactly as it was, also after an error,
and the context managers built on them (ABN loop, AIG skipping, inversion) do too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.hooks import eval_mode, frozen, set_attrs, taps, temporarily
from facetool.models import create_model


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))


def _hooked(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_record_outputs_and_are_removed_on_exit_and_on_error():
    m, x = _net(), torch.randn(5, 4)
    with taps(m, ["0", "2.1", "0"]) as found:  # dotted paths; a repeated name is tapped once
        assert _hooked(m) == 2
        y = m(x)
    assert _hooked(m) == 0
    assert set(found) == {"0", "2.1"} and torch.equal(found["2.1"], y)
    assert torch.equal(found["0"], m[0](x))
    with pytest.raises(RuntimeError, match="inside"):
        with taps(m, ["1"]):
            assert _hooked(m) == 1
            raise RuntimeError("inside")
    assert _hooked(m) == 0


def test_taps_nested_on_the_same_module():
    m, x = _net(), torch.randn(5, 4)
    with taps(m, ["1"]) as outer:
        with taps(m, ["1"]) as inner:
            m(x)
        assert _hooked(m) == 1 and torch.equal(inner["1"], outer["1"])
        m(2 * x)  # the outer tap still records
        assert torch.equal(outer["1"], m[1](m[0](2 * x))) and not torch.equal(inner["1"], outer["1"])
    assert _hooked(m) == 0


def test_taps_detach_and_first_of_a_tuple():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    m = nn.Sequential(nn.Linear(3, 3), Pair())
    x = torch.randn(2, 3)
    with taps(m, ["1"]) as raw, taps(m, ["1"], detach=True, first=True) as kept:
        m(x)
    assert isinstance(raw["1"], tuple)
    assert torch.equal(kept["1"], raw["1"][0]) and not kept["1"].requires_grad and raw["1"][0].requires_grad


def test_taps_unknown_name_is_an_error_naming_it_and_valid_ones():
    m = _net()
    with pytest.raises(FacetoolError, match=r"no module '2\.7'.*2\.1") as e:
        with taps(m, ["0", "2.7"]):
            pass
    assert "\n" not in str(e.value) and _hooked(m) == 0  # nothing was attached
    r = create_model("resnet18", num_classes=3, width=4, input_size=32)
    with pytest.raises(FacetoolError, match=r"no layer 'layer9'.*layer4"):
        with taps(r, ["layer9"]):
            pass
    assert _hooked(r) == 0


def test_distill_taps_is_the_hooks_taps():
    from facetool.trainers.distill import taps as distill_taps

    assert distill_taps is taps


class _Thing:
    flag = "class default"

    def __init__(self) -> None:
        self.value = 1


def test_set_attrs_restores_on_exit_on_error_and_nested():
    a, b = _Thing(), _Thing()
    with set_attrs([a, b], value=2) as objs:
        assert objs == [a, b] and a.value == b.value == 2
        with temporarily(a, value=3):
            assert a.value == 3
        assert a.value == 2
    assert a.value == b.value == 1
    with pytest.raises(ValueError):
        with set_attrs([a, b, a], value=5, extra="new"):
            assert a.value == 5 and b.extra == "new"
            raise ValueError
    assert a.value == b.value == 1 and vars(a) == vars(b) == {"value": 1}  # the added attribute is gone


def test_set_attrs_leaves_a_class_default_inherited():
    a = _Thing()
    with temporarily(a, flag="set"):
        assert a.flag == "set"
    assert a.flag == "class default" and "flag" not in vars(a)


def test_set_attrs_failing_half_way_restores_what_it_set():
    class ReadOnly:
        value = 0

        @property
        def locked(self):
            return 1

    a, r = _Thing(), ReadOnly()
    with pytest.raises(AttributeError):
        with set_attrs([a, r], value=9, locked=2):
            pass
    assert vars(a) == {"value": 1} and "value" not in vars(r) and r.value == 0


def test_eval_mode_and_frozen_restore_each_module():
    m = _net()
    m[2][1].eval()  # a mixed model: a frozen BN inside a training model
    m[0].weight.requires_grad_(False)
    flags = [x.training for x in m.modules()]
    grads = [p.requires_grad for p in m.parameters()]
    with pytest.raises(KeyError):
        with eval_mode(m), frozen(m):
            assert not any(x.training for x in m.modules())
            assert not any(p.requires_grad for p in m.parameters())
            raise KeyError
    assert [x.training for x in m.modules()] == flags and [p.requires_grad for p in m.parameters()] == grads


def test_abn_loop_and_aig_skipping_restored_on_error():
    from facetool.models.abn import ABN, per_attribute_loop
    from facetool.models.gated import gated_blocks, set_skipping

    abn = create_model("abn_resnet18", num_classes=5, heads=[2, 3], input_size=32, width=4)
    with pytest.raises(RuntimeError):
        with per_attribute_loop(abn):
            assert all(m.loop for m in abn.modules() if isinstance(m, ABN))
            raise RuntimeError
    assert not any(m.loop for m in abn.modules() if isinstance(m, ABN))
    aig = create_model("aig_resnet18", num_classes=3, width=4, input_size=32)
    blocks = gated_blocks(aig)
    with pytest.raises(RuntimeError):
        with set_skipping(aig, False):
            assert blocks and not any(b.skip for b in blocks)
            raise RuntimeError
    # back to the class default, not an instance copy of it: the model is as it was built
    assert all(b.skip and "skip" not in vars(b) for b in blocks)


def test_inversion_restores_each_modules_mode_and_grads():
    from facetool.explainers.invert.optimise import embed
    from facetool.explainers.invert.priors import attached, reference_internals

    m = create_model("aig_resnet18", num_classes=3, width=4, input_size=32).train()
    m.bn1.eval()  # frozen stem BN in a training model
    m.fc.weight.requires_grad_(False)
    flags = {n: x.training for n, x in m.named_modules()}
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    with attached(m, []):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    reference_internals(m, torch.randn(2, 3, 32, 32))
    embed(m, torch.randn(2, 3, 32, 32))
    assert {n: x.training for n, x in m.named_modules()} == flags
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
