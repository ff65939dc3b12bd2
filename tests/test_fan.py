"""FAN (models/fan.py): the public face-alignment key layout and sizes, internals, loading public files
(state_dict with or without num_batches_tracked, TorchScript archive, 2 stacks from a 4-stack file)."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from facetool.errors import FacetoolError
from facetool.models import create_model, load_model


def _bn(prefix: str, c: int, tracked: bool = True) -> list[tuple[str, tuple]]:
    keys = [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,))]
    return keys + ([(f"{prefix}.num_batches_tracked", ())] if tracked else [])


def _block(p: str, cin: int, cout: int, tracked: bool) -> list[tuple[str, tuple]]:
    """face-alignment's ConvBlock: bn1 conv1 (out/2) bn2 conv2 (out/4) bn3 conv3 (out/4), downsample
    = Sequential(BN, ReLU, 1x1 conv) when the widths differ."""
    h, q = cout // 2, cout // 4
    keys = [*_bn(f"{p}.bn1", cin, tracked), (f"{p}.conv1.weight", (h, cin, 3, 3)), *_bn(f"{p}.bn2", h, tracked),
            (f"{p}.conv2.weight", (q, h, 3, 3)), *_bn(f"{p}.bn3", q, tracked), (f"{p}.conv3.weight", (q, q, 3, 3))]
    if cin != cout:
        keys += [*_bn(f"{p}.downsample.0", cin, tracked), (f"{p}.downsample.2.weight", (cout, cin, 1, 1))]
    return keys


def public_fan_layout(stacks: int, points: int = 68, tracked: bool = True) -> list[tuple[str, tuple]]:
    """The face-alignment FAN state_dict written from its description (REFERENCE.md): stem conv1 (7x7,
    bias) bn1 conv2 conv3 conv4; per stack m{i} (HourGlass depth 4: b1_L, b2_L, the level below, b3_L;
    b2_plus_1 at the bottom), top_m_{i}, conv_last{i}, bn_end{i}, l{i}, and bl{i}/al{i} between stacks."""
    keys = [("conv1.weight", (64, 3, 7, 7)), ("conv1.bias", (64,)), *_bn("bn1", 64, tracked),
            *_block("conv2", 64, 128, tracked), *_block("conv3", 128, 128, tracked),
            *_block("conv4", 128, 256, tracked)]

    def hourglass(p: str, level: int) -> list:
        ks = _block(f"{p}.b1_{level}", 256, 256, tracked) + _block(f"{p}.b2_{level}", 256, 256, tracked)
        ks += hourglass(p, level - 1) if level > 1 else _block(f"{p}.b2_plus_1", 256, 256, tracked)
        return ks + _block(f"{p}.b3_{level}", 256, 256, tracked)

    for i in range(stacks):
        keys += [*hourglass(f"m{i}", 4), *_block(f"top_m_{i}", 256, 256, tracked),
                 (f"conv_last{i}.weight", (256, 256, 1, 1)), (f"conv_last{i}.bias", (256,)),
                 *_bn(f"bn_end{i}", 256, tracked), (f"l{i}.weight", (points, 256, 1, 1)), (f"l{i}.bias", (points,))]
        if i < stacks - 1:
            keys += [(f"bl{i}.weight", (256, 256, 1, 1)), (f"bl{i}.bias", (256,)),
                     (f"al{i}.weight", (256, points, 1, 1)), (f"al{i}.bias", (256,))]
    return keys


def public_state_dict(stacks: int, seed: int = 0, tracked: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in the public layout (running_var positive), as a published file would hold them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in public_fan_layout(stacks, tracked=tracked):
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".weight") and len(shape) == 1:
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            sd[k] = torch.randn(shape, generator=g) * (0.5 / fan_in ** 0.5) if len(shape) > 1 else \
                0.05 * torch.randn(shape, generator=g)
    return sd


@pytest.mark.parametrize("stacks,keys,untracked,params", [(4, 1129, 945, 23.82), (2, 599, 501, 12.11)])
def test_fan_has_the_public_key_layout_and_size(stacks, keys, untracked, params):
    m = create_model(f"fan{stacks}")
    sd = m.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == public_fan_layout(stacks)
    assert len(sd) == keys
    assert sum(not k.endswith("num_batches_tracked") for k in sd) == untracked
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == params


def test_fan4_forward_returns_every_stack_heatmaps():
    m = create_model("fan4").eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 256, 256))
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(1, 68, 64, 64)] * 4


def test_fan_internals_are_the_hourglass_halves():
    """h2l = [b1_4, b2_4, b2_3, b2_2, b2_1] outputs, l2h = [b3_1, b3_2, b3_3, b3_4, m{i} output], per
    stack; checked against forward hooks on the modules, at a 128-px input (32 .. 2 px)."""
    from facetool.models.fan import fan_tap

    torch.manual_seed(0)
    m = create_model("fan2", input_size=128).eval()
    seen = {}
    names = ["b1_4", "b2_4", "b2_3", "b2_2", "b2_1", "b3_1", "b3_2", "b3_3", "b3_4"]
    hooks = [m.m1.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n in names]
    hooks.append(m.m1.register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o)))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        plain = m(x)
        out, internals = m(x, return_internals=True)
    for h in hooks:
        h.remove()
    assert len(out) == len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(out, plain))
    assert len(internals["h2l"]) == len(internals["l2h"]) == 2
    h2l, l2h = fan_tap(internals, "h2l-2"), fan_tap(internals, "l2h-2")
    assert [t.shape[-1] for t in h2l] == [32, 16, 8, 4, 2] and [t.shape[-1] for t in l2h] == [2, 4, 8, 16, 32]
    assert all(t.shape[1] == 256 for t in h2l + l2h)
    for t, n in zip(h2l + l2h, names + ["out"]):
        assert torch.equal(t, seen[n]), n
    with pytest.raises(FacetoolError, match="2 hourglass"):
        fan_tap(internals, "h2l-3")


@pytest.mark.parametrize("size", [100, 32, 0])
def test_fan_input_size_must_divide_by_64(size):
    with pytest.raises(FacetoolError, match="multiple of 64"):
        create_model("fan2", input_size=size)


@pytest.mark.parametrize("tracked", [False, True])
def test_load_model_reads_a_public_state_dict_key_exact(tmp_path, tracked):
    sd = public_state_dict(4, tracked=tracked)
    path = tmp_path / "2DFAN4-test.pth.tar"
    torch.save(sd, path)
    m = load_model(path)
    assert type(m).__name__ == "FAN" and m.num_stacks == 4 and m.config["name"] == "fan4" and not m.training
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert len(own) == 1129


def test_two_stacks_from_a_four_stack_file(tmp_path):
    """The thesis's 2-stack FAN: stacks 0-1 of the 4-stack file (bl1/al1 and stacks 2-3 dropped); its
    final heatmaps equal the 4-stack FAN's second-stack heatmaps exactly."""
    path = tmp_path / "2DFAN4.pth.tar"
    torch.save(public_state_dict(4), path)
    m4, m2 = load_model(path), load_model(path, name="fan2")
    assert m2.num_stacks == 2 and len(m2.state_dict()) == 599
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        o4, o2 = m4(x), m2(x)
    assert torch.equal(o2[0], o4[0]) and torch.equal(o2[1], o4[1])


def test_wrong_keys_are_named(tmp_path):
    sd = public_state_dict(2)
    sd["m0.b1_4.extra.weight"] = sd.pop("m0.b1_4.conv1.weight")
    path = tmp_path / "bad.pth.tar"
    torch.save(sd, path)
    with pytest.raises(FacetoolError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and "missing keys: m0.b1_4.conv1.weight" in msg and "unexpected keys: m0.b1_4.extra.weight" in msg


def test_torchscript_archive_loads_without_running_its_code(tmp_path):
    """A traced FAN saved with torch.jit.save (as face-alignment's 2DFAN4-*.zip) gives the same weights and
    outputs; an archive whose pickle names any other global is refused, in one line."""
    import warnings

    torch.manual_seed(0)
    ref = create_model("fan1", input_size=64).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ref, torch.rand(1, 3, 64, 64), strict=False)
    path = tmp_path / "2DFAN1.zip"
    traced.save(str(path))
    m = load_model(path, input_size=64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x)[-1], ref(x)[-1])

    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(print))
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(FacetoolError, match="refused global builtins.print"):
        load_model(bad)


IDENTITY_CROP = (torch.tensor([[128.0, 128.0]]), torch.tensor([1.28]))  # h = 200 * 1.28 = 256: the 256 crop itself


def _one_hot(col: int, row: int, size: int = 64) -> torch.Tensor:
    hm = torch.zeros(1, 1, size, size)
    hm[0, 0, row, col] = 1.0
    return hm


def test_heatmap_decoding_known_answers():
    """(col+1, row+1) - 0.5 = (10.5, 20.5), x 4 = (42, 82); a larger right neighbour: x 10.75 -> 43; larger
    left: 10.25 -> 41; larger below: y 20.75 -> 83; on the border (col 0) no shift: 0.5 x 4 = 2."""
    from facetool import heatmaps_to_landmarks

    assert heatmaps_to_landmarks(_one_hot(10, 20), *IDENTITY_CROP).tolist() == [[[42.0, 82.0]]]
    assert heatmaps_to_landmarks(_one_hot(10, 20)).tolist() == [[[42.0, 82.0]]]
    right = _one_hot(10, 20)
    right[0, 0, 20, 11] = 0.5
    assert heatmaps_to_landmarks(right, *IDENTITY_CROP).tolist() == [[[43.0, 82.0]]]
    left = _one_hot(10, 20)
    left[0, 0, 20, 9] = 0.5
    below = _one_hot(10, 20)
    below[0, 0, 21, 10] = 0.5
    assert heatmaps_to_landmarks(left).tolist() == [[[41.0, 82.0]]]
    assert heatmaps_to_landmarks(below).tolist() == [[[42.0, 83.0]]]
    edge = _one_hot(0, 20)
    edge[0, 0, 20, 1] = 0.5  # ignored on the border
    assert heatmaps_to_landmarks(edge).tolist() == [[[2.0, 82.0]]]


def test_heatmap_decoding_is_batched_and_maps_back_through_the_crop():
    """center (100, 50), scale 2 (h = 400): x = 400 (10.5/64 - 0.5) + 100 = -34.375 -> -34 (toward zero),
    y = 400 (20.5/64 - 0.5) + 50 = -21.875 -> -21; each batch item with its own crop."""
    from facetool.models.fan import heatmaps_to_landmarks

    hm = torch.zeros(2, 3, 64, 64)
    hm[:, :, 20, 10] = 1.0
    hm[1, 2, 20, 10], hm[1, 2, 40, 30] = 0.0, 1.0
    # float64: 1.28 in float32 is 1.27999997, h = 255.99999, and 161.99999 truncates to 161 (as in the public code)
    center, scale = torch.tensor([[100.0, 50.0], [128.0, 128.0]]), torch.tensor([2.0, 1.28], dtype=torch.float64)
    pts = heatmaps_to_landmarks(hm, center, scale)
    assert pts.shape == (2, 3, 2)
    assert pts[0].tolist() == [[-34.0, -21.0]] * 3
    assert pts[1].tolist() == [[42.0, 82.0], [42.0, 82.0], [122.0, 162.0]]
    assert heatmaps_to_landmarks(hm, center, scale, truncate=False)[0, 0].tolist() == [-34.375, -21.875]


# -- a FAN where an embedding model belongs; an absurd recorded landmark count (REC-2) -------------------------
def test_a_fan_is_refused_by_embedding_commands_in_one_line(tmp_path):
    """A FAN (output_kind heatmaps) is no face embedding whatever --features says: select_features and
    require_embedder (eval lfw|ijbc, invert, export) and dissect routing refuse it in one line naming
    --model and what the command takes, before anything is written (it used to pass as an embedding model:
    export failed inside the ONNX export, dissect routing clustered hourglass features)."""
    from conftest import run_facetool
    from facetool.data.synthetic import prepare_synthetic
    from facetool.errors import FacetoolError
    from facetool.models import create_model, save_checkpoint
    from facetool.models.features import require_embedder, select_features

    fan = create_model("fan1", width=8, input_size=64)
    for features in ("embedding", "penultimate", "logits"):
        with pytest.raises(FacetoolError, match="landmark model \\(FAN\\)"):
            select_features(fan, features)
    with pytest.raises(FacetoolError, match="face-recognition model"):
        require_embedder(fan)
    path = save_checkpoint(tmp_path / "fan.pt", fan)
    prepare_synthetic(tmp_path / "s.h5", identities=3, per_identity=2, size=64, seed=0)
    for argv in (["export", "--model", path, "--out", tmp_path / "o" / "fan.onnx"],
                 ["dissect", "routing", "--model", path, "--store", tmp_path / "s.h5", "--clusters", 2,
                  "--split", "all", "--out", tmp_path / "o"],
                 ["invert", "--model", path, "--images", tmp_path / "s.h5", "--limit", 1, "--out", tmp_path / "o"]):
        r = run_facetool(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--model" in lines[0] and "landmark model" in lines[0], \
            r.stderr
        assert not (tmp_path / "o").exists()


def test_an_absurd_num_landmarks_in_a_checkpoint_is_damage(tmp_path):
    """num_landmarks is bounded like the other size arguments: 10^6 recorded heatmaps is a one-line 'damaged'
    error before the model is built (it used to build 10^6-channel convolutions, then report a shape mismatch)."""
    import torch

    from facetool.errors import FacetoolError
    from facetool.models import create_model, load_model, save_checkpoint

    path = save_checkpoint(tmp_path / "fan.pt", create_model("fan1", width=8, input_size=64))
    ck = torch.load(path, weights_only=True)
    assert ck["config"].get("num_landmarks", 68) == 68  # recorded when not the default (wflw98: 98)
    ck["config"]["num_landmarks"] = 10**6
    torch.save(ck, path)
    with pytest.raises(FacetoolError, match=r"damaged: its config has num_landmarks 1000000 \(a whole number from 1 "
                                            r"to 1024"):
        load_model(path)
