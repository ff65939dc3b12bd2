"""`facetool train arcface`: the method plugin, its errors, and a learning run on synthetic faces."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import learning_seeds

from facetool.errors import FacetoolError
from facetool.trainers.arcface import ArcFaceMethod, embed_dataset, pair_stats, parse_margins, resolve_network


def test_method_loss_metric_and_meta():
    torch.manual_seed(0)
    method = ArcFaceMethod(num_classes=4, embedding_size=3, loss="cosface", s=10.0)
    head = method.modules()["head"]
    with torch.no_grad():
        head.weight.copy_(torch.eye(4, 3))  # class 3 has a zero weight -> cos 0
    emb = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, -1.0]])
    labels = torch.tensor([0, 2, 2])
    batch = {"label": labels}
    terms = method.loss(None, batch, emb, {})
    cos = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, 0]])
    margin = cos.clone()
    margin[0, 0] -= 0.4
    margin[1, 2] -= 0.4
    margin[2, 2] -= 0.4
    assert list(terms) == ["ce"]
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(10 * margin, labels).item(), abs=1e-4)
    assert method.metrics(batch, emb, {}) == {"top1": pytest.approx(1 / 3)}  # argmax of plain cosines
    assert method.meta() == {"loss": "cosface", "margins": [1.0, 0.0, 0.4], "s": 10.0, "num_classes": 4}


def test_pair_stats_by_hand():
    feats = np.array([[1.0, 0], [1.0, 0], [0, 1.0], [0.6, 0.8]])
    labels = np.array([0, 0, 1, 1])
    st = pair_stats(feats, labels)
    # genuine pairs: (0,1) cos 1, (2,3) cos 0.8; impostors: (0,2) 0, (0,3) .6, (1,2) 0, (1,3) .6
    assert st["genuine_cos"] == pytest.approx(0.9)
    assert st["impostor_cos"] == pytest.approx(0.3)
    assert st["dprime"] == pytest.approx(0.6 / np.sqrt((0.01 + 0.09) / 2), rel=1e-4)
    assert st["auc"] == pytest.approx(1.0)
    with pytest.raises(FacetoolError, match="two identities"):
        pair_stats(feats[:2], labels[:2])


def test_options_and_errors(cli, tmp_path):
    assert resolve_network("r50") == "iresnet50" and resolve_network("mbf") == "mobilefacenet"
    assert parse_margins("1.0,0.5,0.0") == (1.0, 0.5, 0.0) and parse_margins("") is None
    with pytest.raises(FacetoolError, match="three numbers"):
        parse_margins("0.5")
    with pytest.raises(FacetoolError, match="unknown loss"):
        ArcFaceMethod(4, 8, loss="triplet")
    res = cli("train", "arcface", "--store", tmp_path / "none.h5", "--out", tmp_path / "run")
    assert res.exit_code != 0 and "face store not found" in res.output and "Traceback" not in res.output


def test_seed_decides_the_initial_weights(tmp_path, monkeypatch):
    """train_arcface seeds before it builds the backbone and the margin head: the weights it hands to the
    engine depend on --seed only, not on what ran before in the process."""
    import facetool.trainers.arcface as arc
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=3, per_identity=2, size=32, seed=0)
    initial = []

    def first_weights(model, method, train_ds, cfg, val_ds):  # the engine's entry: record, do not train
        initial.append({**{f"backbone.{k}": v.clone() for k, v in model.state_dict().items()},
                        **{f"head.{k}": v.clone() for k, v in method.head.state_dict().items()}})
        return {}

    monkeypatch.setattr(arc, "train", first_weights)
    for k, seed in enumerate([0, 0, 1]):
        torch.manual_seed(1000 + k)  # a different global generator state before every run
        cfg = TrainConfig(out=tmp_path / f"run{k}", seed=seed, epochs=1, batch_size=2, workers=0)
        cfg.out.mkdir()
        arc.train_arcface(store, cfg, network="r18", embedding_size=8, input_size=32, model_kwargs={"width": 4},
                          pair_eval=False)
    same, other = initial[0], initial[1]
    assert same.keys() == other.keys() == initial[2].keys()
    assert all(torch.equal(same[k], other[k]) for k in same)  # same seed: identical
    differs = [k for k in same if not torch.equal(same[k], initial[2][k])]
    assert "head.weight" in differs and "backbone.conv1.weight" in differs  # another seed: other weights


def _bin_pack(store, path, pairs: int = 20) -> None:
    """A small insightface-style ``.bin`` pack (JPEG bytes, issame list) from the store's test split."""
    from facetool.store import FaceStore

    with FaceStore(store) as s:
        idx = s.indices("test")
        labels = s.labels[idx]
        images = s.images(idx)
    rng = np.random.default_rng(0)
    bins, issame = [], []
    for k in range(pairs):
        a = int(rng.integers(len(idx)))
        same = k % 2 == 0
        cand = np.flatnonzero((labels == labels[a]) != (not same))
        cand = cand[cand != a]
        b = int(rng.choice(cand))
        for i in (a, b):
            bins.append(cv2.imencode(".jpg", images[i][:, :, ::-1])[1].tobytes())
        issame.append(same)
    path.write_bytes(pickle.dumps((bins, issame), protocol=2))


@pytest.mark.slow
def test_train_arcface_learns_to_separate_identities(cli, synthetic_store, tmp_path):
    """ArcFace on 8 synthetic identities, averaged over learning_seeds(2) (backbone init, head, data
    order); the first seed's run is interrupted and resumed. Measured means (d' gain over the untrained
    backbone, trained AUC, train top-1): seeds 0,1: 2.26 (3.06, 1.46), 0.95, 0.93
    (thresholds 1.0, 0.8, 0.8); seeds 100,101 and 200,201: not measured yet (overloaded machine)."""
    from facetool.data.dataset import FaceDataset
    from facetool.models import create_model, load_model

    pack = tmp_path / "synth.bin"
    _bin_pack(synthetic_store, pack)
    test_ds = FaceDataset(synthetic_store, "test", size=48)
    gains, aucs, top1 = [], [], []
    for k, seed in enumerate(learning_seeds(2)):
        out = tmp_path / f"arc{seed}"
        args = ["train", "arcface", "--store", synthetic_store, "--out", out, "--network", "r18", "--width", "8",
                "--input-size", "48", "--embedding-size", "64", "--loss", "arcface", "--epochs", "12",
                "--batch-size", "16", "--lr", "0.1", "--workers", "0", "--grad-clip", "5",  # as measured (0.2.x default)
                "--val-bin", pack, "--seed", str(seed)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two fighting on a busy box
        try:
            torch.manual_seed(seed)  # train arcface seeds with --seed before building: init_model is its backbone
            init_model = create_model("iresnet18", width=8, input_size=48, embedding_size=64)
            torch.manual_seed(seed)
            if k == 0:
                res = cli(*args, "--max-steps", "20")  # interrupted run ...
                assert res.exit_code == 0, res.output
                res = cli(*args, "--resume")  # ... resumed to the end
            else:
                res = cli(*args)
            assert res.exit_code == 0, res.output
        finally:
            torch.set_num_threads(threads)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, 13))
        last = rows[-1]
        assert {"synth_acc", "synth_acc_std", "pairs_auc", "val_top1"} <= set(last)
        init = pair_stats(*embed_dataset(init_model, test_ds))
        trained_model = load_model(out / "model.pt")
        trained = pair_stats(*embed_dataset(trained_model, test_ds))
        assert trained["dprime"] == pytest.approx(last["pairs_dprime"], rel=1e-4)
        gains.append(trained["dprime"] - init["dprime"])
        aucs.append(trained["auc"])
        top1.append(last["train_top1"])
        if k == 0:
            backbone = load_model(out / "backbone.pth")  # plain state_dict, architecture inferred from the keys
            assert backbone.config == {"name": "iresnet18", "embedding_size": 64, "input_size": 48, "width": 8}
            x = torch.randn(2, 3, 48, 48)
            with torch.no_grad():
                assert torch.allclose(backbone(x), trained_model(x))
            assert json.loads((out / "config.json").read_text())["method_meta"]["loss"] == "arcface"
    print(f"[measured] arcface seeds {learning_seeds(2)}: d' gain {gains} auc {aucs} train top1 {top1}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(gains) > 1.0, gains  # genuine and impostor similarities pulled apart
    assert mean(aucs) > 0.8, aucs
    assert mean(top1) > 0.8, top1
