"""Attention Branch Network: shapes at any input size, the map, what the perception branch sees,
batched multi-task pass == the reference per-attribute loop, checkpoints, loss terms, `train abn`."""

from __future__ import annotations

import pytest
import torch

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.models import create_model, load_model, save_checkpoint
from facetool.models.abn import per_attribute_loop
from facetool.tasks import Task, split_logits, task_loss

HEADS = [2, 3, 2]


def _abn(name="abn_resnet18", heads=HEADS, size=64, **kw):
    torch.manual_seed(0)
    return create_model(name, num_classes=sum(heads), heads=heads, input_size=size, width=4, **kw)


@pytest.mark.parametrize("size", [64, 112, 224])
@pytest.mark.parametrize("name,stride", [("abn_resnet18", 16), ("abn_resnet50", 16), ("abn_iresnet18", 8)])
def test_shapes_at_any_input_size(name, stride, size):
    m = _abn(name, size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out, it = m(x, return_internals=True)
    side = -(-size // stride)  # layer3's map: /16 for ResNets (stem /4), /8 for IR-ResNets (stride-1 stem)
    assert out.shape == (2, sum(HEADS))
    assert it["attention"].shape == (2, len(HEADS), side, side)
    assert it["attention_logits"].shape == (2, sum(HEADS))
    assert set(m.internal_names) == {"attention", "attention_logits"}
    single = _abn(name, heads=[5], size=size).eval()
    with torch.no_grad():
        o1, i1 = single(x, return_internals=True)
    assert o1.shape == (2, 5) and i1["attention"].shape == (2, 1, side, side)


def test_map_in_unit_interval_and_perception_sees_one_plus_m_times_g():
    for mech in ("residual", "multiply"):
        m = _abn(mechanism=mech).eval()
        seen = {}
        h1 = m.layer3.register_forward_hook(lambda mod, i, o: seen.__setitem__("g", o))
        h2 = m.layer4.register_forward_pre_hook(lambda mod, i: seen.__setitem__("in", i[0]))
        x = torch.randn(3, 3, 64, 64) * 3
        with torch.no_grad():
            _, it = m(x, return_internals=True)
        h1.remove(), h2.remove()
        M, g = it["attention"], seen["g"]
        assert float(M.min()) >= 0.0 and float(M.max()) <= 1.0 and float(M.std()) > 0
        w = (1 + M) if mech == "residual" else M
        expect = (g[:, None] * w[:, :, None]).flatten(0, 1)  # (B*A, c, h, w), attribute-major per image
        assert seen["in"].shape == (3 * len(HEADS), *g.shape[1:])
        torch.testing.assert_close(seen["in"], expect, rtol=0, atol=0)
        # hand check of one element: image 1, attribute 2, channel 0, pixel (1, 2)
        a = float(M[1, 2, 1, 2])
        want = float(g[1, 0, 1, 2]) * ((1 + a) if mech == "residual" else a)
        assert float(seen["in"][1 * len(HEADS) + 2, 0, 1, 2]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["abn_resnet18", "abn_resnet50", "abn_iresnet18"])
def test_batched_pass_equals_per_attribute_loop(name):
    m = _abn(name, heads=[2, 3, 2, 4]).eval()
    for p in m.parameters():  # non-trivial BN statistics and weights
        p.data.add_(0.05 * torch.randn_like(p))
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out_b, it_b = m(x, return_internals=True)
        with per_attribute_loop(m):
            assert m.loop
            out_l, it_l = m(x, return_internals=True)
        assert not m.loop
    torch.testing.assert_close(out_b, out_l, rtol=0, atol=1e-5)
    torch.testing.assert_close(it_b["attention"], it_l["attention"], rtol=0, atol=1e-6)
    # each head's logits depend only on its own map: changing map 1 leaves heads 0, 2, 3 unchanged
    with torch.no_grad():
        g = m.layer3(m.layer2(m.layer1(m.stem(x))))
        maps, _ = m.attention(g)
        maps2 = maps.clone()
        maps2[:, 1] = 1 - maps2[:, 1]
        o1 = m.forward_head(m.perceive(g, maps))
        o2 = m.forward_head(m.perceive(g, maps2))
    torch.testing.assert_close(o1, out_b)
    t = Task("attributes", list("abcd"), [2, 3, 2, 4], [["0", "1"], ["0", "1", "2"], ["0", "1"], list("0123")])
    p1, p2 = split_logits(o1, t), split_logits(o2, t)
    assert not torch.allclose(p1[1], p2[1])
    for k in (0, 2, 3):
        torch.testing.assert_close(p1[k], p2[k], rtol=0, atol=1e-6)


def test_checkpoint_roundtrip_and_named_layers(tmp_path):
    m = _abn(mechanism="multiply").eval()
    save_checkpoint(tmp_path / "abn.pt", m)
    back = load_model(tmp_path / "abn.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), back(x), rtol=0, atol=0)
    assert back.config["mechanism"] == "multiply" and back.config["heads"] == HEADS
    assert m.cam_layer in m.layer_names and m.get_layer("att_layer4") is m.att_layer4
    with pytest.raises(FacetoolError, match="has no layer 'fc7'"):
        m.get_layer("fc7")
    # the attention copy of the last stage runs at stride 1 and has its own weights
    assert all(c.stride == (1, 1) for c in m.att_layer4.modules() if isinstance(c, torch.nn.Conv2d))
    assert m.att_layer4[0].conv1.weight.data_ptr() != m.layer4[0].conv1.weight.data_ptr()


def test_att_channels_widen_the_bottleneck_and_a_dead_one_gives_a_constant_map():
    m = _abn(heads=[2], att_channels=16).eval()
    assert m.att_conv.out_channels == 16 and m.att_conv2.in_channels == 16 and m.att_conv2.out_channels == 2
    assert m.att_conv3.in_channels == 16 and m.config["att_channels"] == 16
    paper = _abn(heads=[2]).eval()
    assert paper.att_conv.out_channels == 2  # the model's att_channels=None: K = number of outputs (the paper)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, it = paper(x, return_internals=True)
        assert float(it["attention"].std()) > 0
        paper.att_bn2.bias.fill_(-1e3)  # BN + ReLU zero every channel: the collapse seen on binary attributes
        _, it = paper(x, return_internals=True)
    M = it["attention"]
    want = torch.sigmoid(paper.att_bn3(torch.zeros(1, 1, 1, 1)))  # sigmoid(att_bn3(0)) everywhere
    torch.testing.assert_close(M, want.expand_as(M), rtol=0, atol=1e-6)
    assert float(it["attention_logits"].abs().max()) == 0.0


def test_checkpoint_config_of_0_2_1_loads_with_the_paper_bottleneck(tmp_path):
    """0.2.1's `train abn` wrote no att_channels unless given (a library call could record None); both
    mean K = C, the shapes those checkpoints hold."""
    from facetool.io import torch_save

    ref = _abn(heads=[2], att_channels=2).eval()
    x = torch.randn(2, 3, 64, 64)
    for extra in ({}, {"att_channels": None}):
        cfg = {"name": "abn_resnet18", "num_classes": 2, "input_size": 64, "width": 4, "heads": [2],
               "mechanism": "residual", **extra,
               "task": {"kind": "attribute", "names": ["gender"], "classes": [2], "vocab": [["f", "m"]]}}
        path = tmp_path / f"old{len(extra)}.pt"
        torch_save({"format": "facetool-checkpoint", "version": 1, "config": cfg, "state_dict": ref.state_dict(),
                    "meta": {"method": "abn"}}, path)
        m = load_model(path)
        assert (m.att_conv.out_channels, m.att_conv2.in_channels, m.att_conv3.in_channels) == (2, 2, 2)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_train_abn_default_bottleneck_is_max_of_outputs_and_16(tmp_path, cli):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models.abn import att_channels_option

    # not given -> max(C, 16), recorded only where it is not C; 0 -> the paper's K = C (not recorded); K -> K
    assert [att_channels_option(None, c) for c in (2, 6, 16, 80)] == [16, 16, None, None]
    assert [att_channels_option(v, 2) for v in (0, 1, 6)] == [None, 1, 6]
    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=4, size=32, seed=0)
    for opt, k in (((), 16), (("--att-channels", "0"), 2)):  # one binary attribute: C = 2
        r = cli("train", "abn", "--store", store, "--out", tmp_path / f"run{k}", "--arch", "resnet18", "--width", "4",
                "--task", "attribute:gender", "--epochs", "1", "--batch-size", "8", "--workers", "0", *opt)
        assert r.exit_code == 0, r.output
        m = load_model(tmp_path / f"run{k}" / "model.pt")
        assert (m.att_conv.out_channels, m.att_conv2.in_channels, m.att_conv3.in_channels) == (k, k, k)
        assert m.att_conv2.out_channels == 2 and m.config.get("att_channels") == (16 if k == 16 else None)


def test_bad_construction():
    with pytest.raises(FacetoolError, match="residual, multiply"):
        _abn(mechanism="add")
    with pytest.raises(FacetoolError, match="sum to num_classes"):
        create_model("abn_resnet18", num_classes=6, heads=[2, 3], width=4)
    with pytest.raises(FacetoolError, match="att_channels must be >= 1"):
        create_model("abn_resnet18", num_classes=2, width=4, att_channels=0)


def test_abn_loss_is_attention_plus_perception_ce():
    from facetool.trainers.abn import ABNMethod

    t = Task("attributes", ["a", "b", "c"], HEADS, [["0", "1"], ["0", "1", "2"], ["0", "1"]])
    m = _abn().train()
    x = torch.randn(4, 3, 64, 64)
    batch = {"image": x, "attrs": torch.tensor([[0, 2, 1], [1, -1, 0], [1, 0, -1], [0, 1, 1]]),
             "label": torch.zeros(4, dtype=torch.long)}
    with torch.no_grad():
        out, it = m(x, return_internals=True)
    method = ABNMethod(task=t, majority=[0, 0, 1])
    terms = method.loss(m, batch, out, it)
    assert set(terms) == {"ce", "att_ce"}
    assert float(terms["ce"]) == pytest.approx(float(task_loss(out, batch, t)), rel=1e-6)
    assert float(terms["att_ce"]) == pytest.approx(float(task_loss(it["attention_logits"], batch, t)), rel=1e-6)
    met = method.metrics(batch, out.detach(), it)
    assert {"attr_acc", "attr_base", "att_attr_acc", "acc_a", "att_acc_a", "base_a"} <= set(met)
    ident = ABNMethod()
    terms = ident.loss(m, batch, out, it)
    assert float(terms["att_ce"]) == pytest.approx(
        float(torch.nn.functional.cross_entropy(it["attention_logits"], batch["label"])), rel=1e-6)


def test_train_abn_cli(tmp_path):
    from facetool.data.synthetic import prepare_synthetic

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=4, size=48, seed=0)
    r = run_facetool("train", "abn", "--store", store, "--out", tmp_path / "run", "--arch", "resnet18", "--width", "4",
                     "--epochs", "1", "--batch-size", "8", "--task", "attributes:gender,facial_hair",
                     "--att-channels", "6")
    assert r.returncode == 0, r.stderr
    assert "val_att_attr_acc" in r.stdout and "majority %" in r.stdout
    m = load_model(tmp_path / "run" / "model.pt")
    assert m.config["heads"] == [2, 2] and m.config["task"]["names"] == ["gender", "facial_hair"]
    assert m.meta["method"] == "abn" and m.config["att_channels"] == 6 and m.att_conv.out_channels == 6
    r = run_facetool("train", "abn", "--store", store, "--out", tmp_path / "bad", "--mechanism", "add")
    assert r.returncode == 2 and "residual, multiply" in r.stderr and not (tmp_path / "bad").exists()
    r = run_facetool("train", "abn", "--store", store, "--out", tmp_path / "bad", "--att-channels", "-1")
    assert r.returncode == 2 and "--att-channels must be in [0, 4096]" in r.stderr and not (tmp_path / "bad").exists()
    r = run_facetool("train", "abn", "--store", store, "--out", tmp_path / "bad", "--arch", "vgg16")
    assert r.returncode == 2 and "iresnet100" in r.stderr and not (tmp_path / "bad").exists()
