"""FAN-Face (thesis ch. 3): the model's known answers (gamma = 0 is the recogniser exactly, integration keeps
y's shape, 54 input channels, the frozen FAN, Table 3.2's cost ordering), checkpoints, and the commands end
to end in subprocesses: train fan -> train fanface -> eval lfw / export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_facetool

FAN = {"name": "fan2", "width": 16, "input_size": 64}


def _fanface(**kw):
    from facetool.models import create_model

    torch.manual_seed(0)
    args = {"fan": FAN, "network": "r18", "width": 8, "embedding_size": 16, "input_size": 32, **kw}
    return create_model("fanface", **args).eval()


def test_adain_known_values():
    """content [1, 2, 3, 4] (mean 2.5, var 1.25) to the statistics of style [10, 10, 12, 12] (mean 11, var 1):
    (c - 2.5) / sqrt(1.25) + 11 = 9.658359, 10.552786, 11.447214, 12.341641 (eps 1e-5 changes the 6th digit)."""
    from facetool.models.fanface import adain

    c = torch.tensor([1.0, 2, 3, 4]).reshape(1, 1, 2, 2)
    s = torch.tensor([10.0, 10, 12, 12]).reshape(1, 1, 2, 2)
    got = adain(c, s, eps=0.0).flatten()
    assert torch.allclose(got, torch.tensor([9.658359, 10.552786, 11.447214, 12.341641]), atol=1e-5)


@pytest.mark.parametrize("kind", ["bl", "sl", "al"])
def test_integration_keeps_the_shape_of_y(kind):
    from facetool.models.fanface import Integration

    layer = Integration(kind, 16, 32, gamma=0.5).eval()
    x_l, y = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 7, 7)
    out = layer(x_l, y)
    assert out.shape == y.shape and not torch.equal(out, y)
    with torch.no_grad():
        layer.gamma.zero_()
    assert torch.equal(layer(x_l, y), y)


@pytest.mark.parametrize("integration,mode", [("bl", "1-1"), ("sl", "1-1"), ("al", "1-1"), ("bl", "1-m")])
def test_gamma_zero_is_the_recogniser_without_integration_exactly(integration, mode):
    """The same recogniser weights in a plain IR-ResNet: equal outputs bit for bit at gamma = 0, different ones
    at gamma != 0 (so the comparison can fail)."""
    from facetool.models import create_model

    ff = _fanface(integration=integration, mode=mode)
    plain = create_model("iresnet18", width=8, embedding_size=16, input_size=32).eval()
    plain.load_state_dict(ff.frn.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for stage in ff.integrations:
            for m in stage:
                m.gamma.fill_(0.3)
        assert not torch.allclose(ff(x), plain(x), atol=1e-3)
        for stage in ff.integrations:
            for m in stage:
                m.gamma.zero_()
        assert torch.equal(ff(x), plain(x))
    assert ff.gammas() == [0.0] * (4 if mode == "1-1" else 8)  # r18: 2 blocks per stage


def test_input_heatmaps_give_54_channels():
    """Eq. 3.1: image + the 51 internal points' heatmaps (no jaw) of hourglass 2 -> conv1 takes 54 channels;
    h2+ also widens each stage's first block by 51."""
    none, h2, h2p = (_fanface(input_heatmaps=h, integration="none") for h in ("none", "h2", "h2+"))
    assert none.frn.conv1.in_channels == 3 and h2.frn.conv1.in_channels == 54 and h2p.frn.conv1.in_channels == 54
    assert h2.points == list(range(17, 68))
    assert [h2p.frn.get_submodule(f"layer{k}")[0].conv1.in_channels for k in range(1, 5)] == [8 + 51, 8 + 51, 16 + 51,
                                                                                               32 + 51]
    x = torch.randn(2, 3, 32, 32)
    out, internals = h2p(x, return_internals=True)
    assert out.shape == (2, 16) and internals["fan_heatmaps"].shape == (2, 51, 16, 16)
    # the heatmaps really enter: zeroing their conv1 weights changes the output
    with torch.no_grad():
        ref = h2(x)
        h2.frn.conv1.weight[:, 3:] = 0
        assert not torch.allclose(h2(x), ref)


def test_the_fan_stays_frozen_while_training():
    """Eval mode after .train(), no gradients, unchanged by an SGD step; the recogniser does change."""
    ff = _fanface(input_heatmaps="h2", integration="bl", multitask=True)
    ff.train()
    assert ff.training and not ff.fan.training and not any(p.requires_grad for p in ff.fan.parameters())
    fan_before = {k: v.clone() for k, v in ff.fan.state_dict().items()}
    frn_before = ff.frn.conv1.weight.clone()
    opt = torch.optim.SGD([p for p in ff.parameters() if p.requires_grad], lr=0.1)
    out, internals = ff(torch.randn(4, 3, 32, 32), return_internals=True)
    loss = out.pow(2).mean() + ((internals["heatmap_pred"] - internals["fan_heatmaps"]) ** 2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in ff.fan.parameters())
    assert all(torch.equal(v, fan_before[k]) for k, v in ff.fan.state_dict().items())  # BN statistics too
    assert not torch.equal(ff.frn.conv1.weight, frn_before)
    assert all(m.gamma.grad is not None and float(m.gamma.grad.abs()) > 0 for s in ff.integrations for m in s)


def test_cost_is_reported_with_and_without_the_fan():
    """Table 3.2's shape: the FAN's cost apart; parameters none < SL < BL < 1-M and BL < AL, GFLOPs
    none < SL < BL < 1-M (the integration layers' cost; FAN not counted)."""
    from facetool.flops import flops_summary

    rows = {}
    for label, kw in {"none": {"integration": "none"}, "sl": {"integration": "sl"}, "bl": {"integration": "bl"},
                      "al": {"integration": "al"}, "1-m": {"integration": "bl", "mode": "1-m"}}.items():
        s = flops_summary(_fanface(**kw))
        rows[label] = (s["params_m"] - s["fan_params_m"], s["gflops"] - s["fan_gflops"], s)
    assert rows["none"][2]["fan_gflops"] == 0  # a plain recogniser never runs its FAN
    fan_g = rows["bl"][2]["fan_gflops"]
    assert fan_g > 0 and rows["bl"][2]["fan_params_m"] == rows["none"][2]["fan_params_m"] > 0
    p = {k: v[0] for k, v in rows.items()}
    g = {k: v[1] for k, v in rows.items()}
    assert p["none"] < p["sl"] < p["bl"] < p["1-m"] and p["bl"] < p["al"]
    assert g["none"] < g["sl"] < g["bl"] < g["1-m"]


def test_checkpoint_holds_both_networks(tmp_path):
    from facetool.models import load_model, save_checkpoint

    ff = _fanface(input_heatmaps="h2+", integration="al", taps="l2h-2", mode="1-m", multitask=True)
    with torch.no_grad():
        for s in ff.integrations:
            for m in s:
                m.gamma.fill_(0.2)
    path = save_checkpoint(tmp_path / "ff.pt", ff)
    back = load_model(path)
    assert back.config["fan"] == FAN and back.config["taps"] == "l2h-2"
    assert any(k.startswith("fan.m1.") for k in back.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), ff(x))


def test_a_four_stack_fan_is_cut_to_two_with_the_same_hourglass_2(tmp_path):
    """A public-layout 4-stack state_dict: the 2-stack FAN-Face FAN gives hourglass 2's heatmaps exactly."""
    from facetool.models import create_model
    from facetool.trainers.fanface import load_fan

    torch.manual_seed(0)
    fan4 = create_model("fan4", width=16, input_size=64).eval()
    path = tmp_path / "2DFAN4-test.pth.tar"
    torch.save(fan4.state_dict(), path)
    fan2 = load_fan(path)
    assert fan2.num_stacks == 2
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fan2(x)[1], fan4(x)[1])


@pytest.fixture(scope="module")
def fanface_run(tmp_path_factory):
    """train fan (tiny, 2 stacks) -> train fanface (BL h2l-2 + H2 input + multi-task), in subprocesses."""
    from facetool.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("fanface")
    store = root / "s.h5"
    prepare_synthetic(store, identities=4, per_identity=6, size=64, seed=0)
    r = run_facetool("train", "fan", "--store", store, "--stacks", "2", "--width", "16", "--input-size", "64",
                     "--epochs", "1", "--batch-size", "8", "--out", root / "fan", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_facetool("train", "fanface", "--store", store, "--fan", root / "fan" / "model.pt", "--network", "r18",
                     "--width", "8", "--embedding-size", "16", "--input-size", "32", "--epochs", "1", "--batch-size",
                     "8", "--input-heatmaps", "h2", "--integration", "bl", "--taps", "h2l-2", "--multitask",
                     "--out", root / "ff", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, store


def test_train_fanface_writes_one_checkpoint(fanface_run):
    root, _ = fanface_run
    ck = torch.load(root / "ff" / "model.pt", weights_only=True)
    assert ck["config"]["name"] == "fanface" and ck["config"]["fan"]["name"] == "fan2"
    assert ck["meta"]["method"] == "fanface" and len(ck["meta"]["gammas"]) == 4
    fan = torch.load(root / "fan" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ck["state_dict"][f"fan.{k}"], v) for k, v in fan.items())  # the FAN is copied, frozen
    rows = [json.loads(x) for x in (root / "ff" / "metrics.jsonl").read_text().splitlines()]
    assert "train_heatmap_l2" in rows[-1] and np.isfinite(rows[-1]["train_heatmap_l2"])
    res = json.loads((root / "ff" / "result.json").read_text())  # what the recipe's summary table reads
    assert res["metrics"] == pytest.approx(rows[-1]) and res["model"]["name"] == "fanface"
    assert 0 < res["fan_gflops"] < res["gflops"] and 0 < res["fan_params_m"] < res["params_m"]


def test_eval_lfw_and_export_of_a_fanface_checkpoint(fanface_run, tmp_path):
    import cv2

    from facetool.models import load_model
    from facetool.models.onnx_model import OnnxModel
    from facetool.store import FaceStore
    from fixtures_ijb import write_bin

    root, store = fanface_run
    model = root / "ff" / "model.pt"
    with FaceStore(store) as s:
        labels = np.asarray(s.labels)
        rows = [int(np.flatnonzero(labels == c)[k]) for c in range(4) for k in range(5)]
        imgs = dict(zip(rows, s.images(rows)))
    bins, issame = [], []
    for p in range(10):
        a = rows[p * 2]
        b = rows[p * 2 + 1] if p % 2 == 0 else rows[(p * 2 + 7) % len(rows)]
        for i in (a, b):
            bins.append(cv2.imencode(".jpg", cv2.cvtColor(imgs[i], cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(bool(labels[a] == labels[b]))
    pack = write_bin(tmp_path / "lfw.bin", bins, issame)
    r = run_facetool("eval", "lfw", "--bin", pack, "--model", model, "--out", tmp_path / "o", "--workers", "0",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["pairs"] == 10 and 0.0 <= res["accuracy"] <= 1.0
    onnx = tmp_path / "ff.onnx"
    r = run_facetool("export", "--model", model, "--out", onnx, "--dynamic-batch", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    torch_model = load_model(model)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = torch_model(x)
    got = OnnxModel(onnx, providers=["CPUExecutionProvider"])(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4



def test_eval_ijbc_of_a_fanface_checkpoint(fanface_run, tmp_path):
    """eval ijbc runs the whole pipeline (frozen FAN included) on the 112 crops resized to the model's 32 px."""
    from fixtures_ijb import make_ijb

    root, _ = fanface_run
    ijb = tmp_path / "IJB"
    make_ijb(ijb, identities=2, templates_per_id=2, seed=0)
    r = run_facetool("eval", "ijbc", "--root", ijb, "--model", root / "ff" / "model.pt", "--out", tmp_path / "o",
                     "--workers", "0", "--batch-size", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IJB-C 1:1" in r.stdout and "model input 32 px" in r.stdout
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["images_extracted"] == res["images"] > 0 and res["input_size"] == 32 and res["pairs"] > 0
    assert all(np.isfinite(v["closest"]) for v in res["tar_at_far"].values())


def test_dissect_relevance_of_a_fanface_checkpoint(fanface_run, tmp_path):
    """Grad-CAM of the embedding's cosine to a same-identity image works on FAN-Face (hooks on its named stages);
    LRP has no FAN canonizer: one line, exit 2, naming the methods that do work, nothing written."""
    import h5py

    root, store = fanface_run
    model = root / "ff" / "model.pt"
    common = ("--model", model, "--store", store, "--target", "cosine", "--reference", "same-identity", "--split",
              "all", "--limit", "4")
    r = run_facetool("dissect", "relevance", *common, "--method", "gradcam", "--out", tmp_path / "rel", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "rel" / "metrics.json").read_text())
    assert res["method"] == "gradcam" and res["images"] == 4 and np.isfinite(res["aopc_morf"])
    with h5py.File(tmp_path / "rel" / "maps.h5", "r") as f:
        arrays = []
        f.visititems(lambda _, d: arrays.append(d[()]) if isinstance(d, h5py.Dataset) and d.ndim == 3 else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays) and any(np.abs(a).sum() > 0 for a in arrays)
    r = run_facetool("dissect", "relevance", *common, "--method", "lrp", "--out", tmp_path / "lrp", cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "FanFace" in err, r.stderr
    assert all(m in err for m in ("gradcam", "gradcam++", "scorecam")), err
    assert not (tmp_path / "lrp").exists()


def test_eval_classify_refuses_fanface_as_every_embedding_model(fanface_run, tmp_path):
    """eval classify refuses FAN-Face with the one line it gives an IR-ResNet, pointing to the verification evals."""
    from facetool.models import create_model, save_checkpoint

    root, store = fanface_run
    rec = save_checkpoint(tmp_path / "rec.pt", create_model("iresnet18", width=8, embedding_size=16, input_size=32))
    errs = []
    for model, name in ((root / "ff" / "model.pt", "fanface"), (rec, "iresnet18")):
        r = run_facetool("eval", "classify", "--store", store, "--model", model, cwd=tmp_path)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        errs.append(err.replace(name, "MODEL"))
    assert errs[0] == errs[1] and "is an embedding model" in errs[0] and "eval lfw|ijbb|ijbc" in errs[0], errs


def test_train_fanface_refuses_what_is_not_a_usable_fan(fanface_run, tmp_path):
    """A recogniser checkpoint or a 1-stack FAN given as --fan: one line naming the problem, exit 2, no run."""
    from facetool.models import create_model, save_checkpoint

    root, store = fanface_run
    rec = save_checkpoint(tmp_path / "rec.pt", create_model("iresnet18", width=8, embedding_size=16, input_size=32))
    one = save_checkpoint(tmp_path / "fan1.pt", create_model("fan1", width=16, input_size=64))
    for path, words in ((rec, "is not a FAN"), (one, "has 1 hourglass")):
        r = run_facetool("train", "fanface", "--store", store, "--fan", path, "--network", "r18", "--out",
                         tmp_path / "run", cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fanface_bl_h2l2_learns_to_verify(tmp_path):
    """FAN-Face (BL h2l-2, 1-1) trained with ArcFace on the synthetic set reaches a held-out verification ROC AUC
    far above chance (0.5). The FAN is a random-init 2-stack FAN (width 16, 64 px; frozen, as always): training
    one first would triple the test's time, and the integration path is the same. Averaged over 2 seeds.
    Measured AUCs (2 seeds each): base 0 -> 0.857, 0.846 (mean 0.851); base 100 -> 0.913, 0.917 (0.915);
    base 200 -> 0.909, 0.925 (0.917).
    Threshold 0.75."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig
    from facetool.models import create_model, save_checkpoint
    from facetool.trainers.fanface import train_fanface
    from conftest import learning_seeds

    store = tmp_path / "s.h5"
    prepare_synthetic(store, identities=16, per_identity=10, size=64, seed=learning_seeds(1)[0])
    aucs = []
    for seed in learning_seeds(2):
        torch.manual_seed(seed)
        fan = save_checkpoint(tmp_path / f"fan{seed}.pt", create_model("fan2", width=16, input_size=64))
        cfg = TrainConfig(out=tmp_path / f"run{seed}", epochs=8, batch_size=32, lr=0.1, schedule="cosine", seed=seed,
                          warmup_epochs=1, grad_clip=5.0, verbose=False)
        res = train_fanface(store, cfg, fan=fan, network="r18", width=8, integration="bl", taps="h2l-2", mode="1-1",
                            embedding_size=32, input_size=32, loss="arcface")
        aucs.append(res["pairs_auc"])
    print("FAN-Face BL h2l-2 pair AUCs", aucs)
    assert np.mean(aucs) > 0.75, aucs


def test_fanface_recipes_dry_run_and_hold_the_ablation_rows():
    """Both FAN-Face recipes parse (--dry-run) and train the Table 3.1 rows with one schedule each."""
    from pathlib import Path

    from facetool.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("fanface_synthetic", "thesis_fanface"):
        r = run_facetool("recipe", root / f"{name}.toml", "--dry-run")
        assert r.returncode == 0, r.stderr
        _, steps = load_recipe(root / f"{name}.toml")
        trains = [" ".join(s.argv) for s in steps if s.argv[:2] == ["train", "fanface"]]
        wanted = ["--input-heatmaps none --integration none", "--input-heatmaps h2 ", "--input-heatmaps h2+ ",
                  "--integration bl --taps h2l-2", "--integration bl --taps l2h-2", "--integration sl",
                  "--integration al", "--mode 1-m", "--multitask"]
        assert all(any(w in t + " " for t in trains) for w in wanted), trains
        if name == "fanface_synthetic":
            assert any(s.argv[:2] == ["train", "fan"] for s in steps)
        else:
            assert all("--batch-size 512" in t and "--milestones 10,18,22" in t for t in trains)


def test_fanface_synthetic_recipe_ends_with_one_table_over_its_runs():
    """Every training step of the ablation recipe names its run's held-out pair AUC and d' (result.json, written
    by every ArcFace-family run) as the headline of the recipe's summary table, and the recipe names its JSON."""
    import tomllib
    from pathlib import Path

    from facetool.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "fanface_synthetic.toml"
    doc = tomllib.loads(path.read_text())
    _, steps = load_recipe(path, {"out": "OUT"})
    assert doc["summary"] == "{out}/summary.json"
    trains = [(s, raw) for s, raw in zip(steps, doc["step"]) if s.argv[:2] == ["train", "fanface"]]
    assert len(trains) == 9
    for s, raw in trains:
        out = s.argv[s.argv.index("--out") + 1]
        heads = raw["headline"]
        assert [h["key"] for h in heads] == ["metrics.pairs_auc", "metrics.pairs_dprime"], raw["name"]
        assert all(h["file"].format(out="OUT") == f"{out}/result.json" for h in heads), (out, heads)
