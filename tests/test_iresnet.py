"""IR-ResNet / MobileFaceNet backbones: arcface_torch key layout, sizes, loading bare state_dicts."""

from __future__ import annotations

import pytest
import torch

from facetool.errors import FacetoolError
from facetool.models import create_model, load_model, save_checkpoint

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3)}


def _bn(prefix: str, c: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def published_layout(blocks: tuple[int, ...], emb: int = 512) -> list[tuple[str, tuple]]:
    """The arcface_torch iresnet state_dict written from its public description (REFERENCE.md):
    stem conv1/bn1/prelu; per block bn1, conv1 3x3, bn2, prelu, conv2 3x3 (stride), bn3, and for the
    first block of each stage downsample.0 (1x1 conv) / downsample.1 (BN); head bn2, fc, features."""
    keys = [("conv1.weight", (64, 3, 3, 3)), *_bn("bn1", 64), ("prelu.weight", (64,))]
    cin = 64
    for stage, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys += [*_bn(f"{p}.bn1", cin), (f"{p}.conv1.weight", (w, cin, 3, 3)), *_bn(f"{p}.bn2", w),
                     (f"{p}.prelu.weight", (w,)), (f"{p}.conv2.weight", (w, w, 3, 3)), *_bn(f"{p}.bn3", w)]
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (w, cin, 1, 1)), *_bn(f"{p}.downsample.1", w)]
            cin = w
    keys += [*_bn("bn2", 512), ("fc.weight", (emb, 512 * 7 * 7)), ("fc.bias", (emb,)), *_bn("features", emb)]
    return keys


def test_r50_state_dict_is_arcface_torch_layout():
    sd = create_model("iresnet50").state_dict()
    assert len(sd) == 475
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == published_layout(DEPTHS[50])


@pytest.mark.parametrize("depth,keys,params", [(18, 187, 24.0), (34, 331, 34.1), (50, 475, 43.6)])
def test_key_and_parameter_counts(depth, keys, params):
    m = create_model(f"iresnet{depth}")
    assert len(m.state_dict()) == keys
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - params) < 0.1
    assert [k for k, _ in published_layout(DEPTHS[depth])] == list(m.state_dict())


def test_forward_contract_and_frozen_features():
    m = create_model("iresnet18", width=8, embedding_size=32, input_size=64).eval()
    assert m.output_kind == "embedding"
    assert not m.features.weight.requires_grad and torch.all(m.features.weight == 1)
    x = torch.randn(2, 3, 64, 64)
    f = m.forward_features(x)
    assert f.shape == (2, 64, 4, 4)  # width 8 -> 8 * 8 channels at 1/16 of the input
    out = m(x)
    assert out.shape == (2, 32)
    assert torch.allclose(m.forward_head(f), out)
    out2, internals = m(x, return_internals=True)
    assert torch.allclose(out2, out) and internals == {}
    with pytest.raises(FacetoolError, match="multiple of 16"):
        create_model("iresnet18", input_size=100)


def test_mobilefacenet_size_and_shapes():
    m = create_model("mobilefacenet")
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 1.2) < 0.05
    assert m.gdc[0].kernel_size == (7, 7) and m.gdc[0].groups == 512  # global depthwise conv over 7x7
    small = create_model("mobilefacenet", embedding_size=128, input_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    f = small.forward_features(x)
    assert f.shape == (2, 512, 4, 4)
    assert torch.allclose(small(x), small.forward_head(f)) and small(x).shape == (2, 128)


def _randomise(m: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.dtype.is_floating_point and "features.weight" not in k:
                v.copy_(torch.rand(v.shape, generator=g) * 0.2 + (0.9 if "running_var" in k else -0.1))
    return m


def test_arcface_torch_backbone_pth_loads_strictly_and_round_trips(tmp_path):
    sd = {k: v.clone() for k, v in _randomise(create_model("iresnet18")).state_dict().items()}
    path = tmp_path / "backbone.pth"
    torch.save(sd, path)  # exactly what arcface_torch writes: a plain state_dict
    m = load_model(path)
    assert m.config == {"name": "iresnet18", "embedding_size": 512, "input_size": 112}
    assert not m.training
    assert list(m.state_dict()) == list(sd)
    assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)


def test_loaded_backbone_computes_the_same_embeddings(tmp_path):
    src = _randomise(create_model("iresnet18", width=8, embedding_size=64, input_size=64)).eval()
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    m = load_model(tmp_path / "backbone.pth")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        assert torch.allclose(m(x), ref)
        save_checkpoint(tmp_path / "m.pt", m)  # facetool checkpoint -> same model
        assert torch.allclose(load_model(tmp_path / "m.pt")(x), ref)


def test_narrow_and_mobilefacenet_state_dicts_are_recognised(tmp_path):
    for name, kw in [("iresnet34", {"width": 8, "embedding_size": 64, "input_size": 64}),
                     ("mobilefacenet", {"embedding_size": 128, "input_size": 112})]:
        m = create_model(name, **kw)
        torch.save(m.state_dict(), tmp_path / f"{name}.pth")
        loaded = load_model(tmp_path / f"{name}.pth")
        assert loaded.config["name"] == name
        assert {k: loaded.config[k] for k in kw} == kw


def test_mismatched_state_dict_names_keys(tmp_path):
    sd = create_model("iresnet18", width=8).state_dict()
    missing = dict(sd)
    del missing["layer2.0.bn3.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(FacetoolError, match=r"missing keys: layer2\.0\.bn3\.running_var") as e:
        load_model(tmp_path / "missing.pth", name="iresnet18", width=8, embedding_size=512, input_size=112)
    assert "\n" not in str(e.value)
    extra = dict(sd, **{"layer4.9.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(FacetoolError, match=r"unexpected keys: layer4\.9\.conv1\.weight"):
        load_model(tmp_path / "extra.pth", name="iresnet18", width=8)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FacetoolError, match="cannot tell the architecture"):
        load_model(tmp_path / "other.pth")
