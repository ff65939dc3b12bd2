"""facetool distill: each loss against hand-computed values, SRRL identities, the frozen teacher,
resume, face-recognition teachers, unlabeled data, diagnostics, bad input, the CLI as a subprocess."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_facetool
from facetool.engine import TrainConfig, train
from facetool.errors import FacetoolError
from facetool.trainers.distill import (DistillMethod, Teacher, at_loss, attention_map, hint_loss, kd_loss, mixup_images,
                                      pkt_loss, resolve_weights, rkd_loss, soft_kd_loss)
from facetool.trainers.srrl import Connector, fm_loss, match_size, sr_loss
from facetool.models import create_model, load_model, save_checkpoint


# -- losses against hand-computed values ------------------------------------------------------------
def test_kd_loss_by_hand():
    # t/T = [ln 3, 0] -> p = [3/4, 1/4]; s = 0 -> q = [1/2, 1/2]; KL * T^2 with T = 2
    t = torch.tensor([[2 * math.log(3), 0.0]])
    s = torch.zeros(1, 2)
    want = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert kd_loss(s, t, T=2.0).item() == pytest.approx(want, rel=1e-6)
    assert kd_loss(t, t, T=4.0).item() == pytest.approx(0.0, abs=1e-5)
    # batchmean: two rows, one identical -> half the loss
    assert kd_loss(torch.cat([s, t]), torch.cat([t, t]), T=2.0).item() == pytest.approx(want / 2, rel=1e-5)
    # the mixed-target form with an explicit target distribution
    assert soft_kd_loss(s, torch.tensor([[0.75, 0.25]]), T=2.0).item() == pytest.approx(want, rel=1e-6)


def test_srrl_losses_by_hand():
    assert fm_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])).item() == pytest.approx(2.0)
    assert sr_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), "l2").item() == pytest.approx(0.5)
    # CE form: p_T = [1/2, 1/2], log p_S = [ln 3/4, ln 1/4]
    want = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert sr_loss(torch.tensor([[math.log(3), 0.0]]), torch.zeros(1, 2), "ce").item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        sr_loss(torch.zeros(1, 2), torch.zeros(1, 2), "l1")


def test_hint_and_attention_by_hand():
    assert hint_loss(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)).item() == pytest.approx(1.0)
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2): channel mean of f^2 = [5, 2]
    assert torch.allclose(attention_map(f), torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    g = torch.tensor([[[[1.0, 0.0]]]])  # attention [1, 0]
    want = ((5 / math.sqrt(29) - 1) ** 2 + (2 / math.sqrt(29)) ** 2) / 2
    assert at_loss([f], [g]).item() == pytest.approx(want, rel=1e-6)
    assert at_loss([f, f], [g, g]).item() == pytest.approx(2 * want, rel=1e-6)  # summed over stages
    # the larger map is average-pooled to the smaller one: a 2x4 student map of two equal halves
    big = f.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # (1, 2, 2, 4) -> pools back to f
    assert at_loss([big], [g]).item() == pytest.approx(want, rel=1e-6)


def _rkd_reference(s: list[list[float]], t: list[list[float]]) -> float:
    """RKD by explicit loops over pairs and triples (smooth-L1 with beta 1, means over all entries)."""
    def dist(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        pos = [x for row in d for x in row if x > 0]
        m = sum(pos) / len(pos)
        return [[x / m for x in row] for row in d]

    def unit(v):
        n = math.hypot(*v)
        return [x / n for x in v] if n > 0 else [0.0 for _ in v]

    def angles(e):
        n = len(e)
        out = []
        for a, i, j in itertools.product(range(n), repeat=3):
            u = unit([x - y for x, y in zip(e[i], e[a])])
            v = unit([x - y for x, y in zip(e[j], e[a])])
            out.append(sum(x * y for x, y in zip(u, v)))
        return out

    def sl1(xs, ys):
        vals = [(0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5) for x, y in zip(xs, ys)]
        return sum(vals) / len(vals)

    ds, dt = dist(s), dist(t)
    ld = sl1([x for r in ds for x in r], [x for r in dt for x in r])
    return 25 * ld + 50 * sl1(angles(s), angles(t))


def test_rkd_by_hand():
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    s = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    # distance part by hand: normalised teacher distances 1/m_t, sqrt2/m_t with m_t = (2 + sqrt2)/3,
    # student 3/4, 3/2, 3/4; smooth-L1 = 0.5 d^2 over 9 entries (3 zero diagonals)
    mt = (2 + math.sqrt(2)) / 3
    diffs = [1 / mt - 0.75, 1 / mt - 1.5, math.sqrt(2) / mt - 0.75]
    ld = 2 * sum(0.5 * d * d for d in diffs) / 9
    only_d = rkd_loss(torch.tensor(s), torch.tensor(t), w_distance=1.0, w_angle=0.0).item()
    assert only_d == pytest.approx(ld, rel=1e-5)
    assert rkd_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(_rkd_reference(s, t), rel=1e-5)
    # invariant to scale (distances normalised by their mean) and translation
    tt = torch.tensor(t)
    assert rkd_loss(3 * tt + 1, tt).item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_by_hand():
    s = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    t = [[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]]
    eps = 1e-7

    def cond(e):
        u = [[x / (math.hypot(*r) + eps) for x in r] for r in e]
        k = [[(sum(a * b for a, b in zip(ui, uj)) + 1) / 2 for uj in u] for ui in u]
        return [[x / sum(row) for x in row] for row in k]

    ps, pt = cond(s), cond(t)
    want = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    assert pkt_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(want, rel=1e-5)
    assert pkt_loss(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(0.0, abs=1e-6)


def test_mixup_keeps_the_labeled_image_dominant():
    torch.manual_seed(0)
    x, u = torch.ones(64, 3, 2, 2), torch.zeros(64, 3, 2, 2)
    mixed, lam = mixup_images(x, u, 0.4)
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert torch.allclose(mixed[:, 0, 0, 0], lam)  # lambda' x + (1 - lambda') u with x = 1, u = 0


def test_weights_defaults_follow_repdistiller_and_the_thesis():
    assert resolve_weights("kd") == {"gamma": 0.1, "alpha": 0.9, "beta": 0.0}
    assert resolve_weights("srrl") == {"gamma": 1.0, "alpha": 1.0, "beta": 1.0}
    assert [resolve_weights(k)["beta"] for k in ("fitnet", "at", "rkd", "pkt")] == [100.0, 1000.0, 1.0, 30000.0]
    assert resolve_weights("srrl", beta=5.0)["beta"] == 5.0
    with pytest.raises(FacetoolError, match="--alpha"):
        resolve_weights("srrl", alpha=float("nan"))
    with pytest.raises(FacetoolError, match="srrl kd fitnet".replace(" ", ", ")):
        resolve_weights("crd")


def test_connector_and_match_size():
    c = Connector(4, 6, relu=True, size=(2, 2))
    y = c(torch.randn(3, 4, 4, 4))
    assert y.shape == (3, 6, 2, 2) and (y >= 0).all()
    assert match_size(torch.randn(1, 2, 2, 2), (4, 4)).shape == (1, 2, 4, 4)


# -- SRRL identities, the frozen teacher, gradients ------------------------------------------------
def _classifier(seed=0, width=8, classes=4, size=32):
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=classes, input_size=size, width=width).eval()


def _run_loss(method, student, x, labels):
    with method.attached(student):
        out = student(x)
        return method.loss(student, {"image": x, "label": labels}, out, {})


def test_srrl_is_zero_when_the_student_is_the_teacher():
    teacher = _classifier()
    student = copy.deepcopy(teacher).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    m = DistillMethod("srrl", Teacher(teacher), student, probe=x)
    assert m.connector.relu  # ResNet maps are post-ReLU
    m.connector = nn.Identity()
    terms = _run_loss(m, student, x, y)
    assert terms["fm"].item() == 0.0 and terms["sr"].item() == 0.0
    # an embedding teacher with a margin head: the same identity
    from facetool.models.heads import MarginHead

    torch.manual_seed(1)
    emb_t = create_model("iresnet18", embedding_size=16, input_size=32, width=8).eval()
    head = MarginHead(16, 4)
    student2 = copy.deepcopy(emb_t).eval()
    m2 = DistillMethod("srrl", Teacher(emb_t, head), student2, probe=x, student_head=MarginHead(16, 4))
    assert not m2.connector.relu  # IR-ResNet maps are signed: no ReLU in the connector
    m2.connector = nn.Identity()
    terms = _run_loss(m2, student2, x, y)
    assert terms["fm"].item() == 0.0 and terms["sr"].item() == 0.0


def test_sr_gradient_reaches_the_student_through_the_frozen_classifier():
    teacher, student = _classifier(0), _classifier(1, width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    m = DistillMethod("srrl", Teacher(teacher), student.train(), probe=x)
    m.connector.train()
    terms = _run_loss(m, student, x, y)
    terms["sr"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # W_T is never updated
    assert m.connector.conv.weight.grad.abs().sum() > 0
    assert student.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # L_SR does not touch the student's own classifier


class _Items(torch.utils.data.Dataset):
    def __init__(self, n=16, classes=4, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.images = torch.linspace(-0.8, 0.8, classes)[self.labels].view(n, 1, 1, 1) + 0.3 * torch.randn(
            n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _cfg(out, **kw):
    base = dict(out=out, epochs=2, batch_size=8, lr=0.05, verbose=False, flip=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kind", ["srrl", "kd", "fitnet", "at", "rkd", "pkt"])
def test_teacher_weights_are_bit_identical_after_distillation(tmp_path, kind):
    teacher = _classifier(0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ds = _Items()
    student = _classifier(1, width=4)
    m = DistillMethod(kind, Teacher(teacher), student, probe=ds.images[:4])
    with m.attached(student):
        res = train(student, m, ds, _cfg(tmp_path, epochs=1, max_steps=2))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    term = {"srrl": "sr", "kd": "kd", "fitnet": "fitnet", "at": "at", "rkd": "rkd", "pkt": "pkt"}[kind]
    assert math.isfinite(res[f"val_{term}"]) if f"val_{term}" in res else True
    assert all(not [h for h in mod._forward_hooks.values()] for mod in student.modules())  # taps removed


def test_resume_reproduces_an_uninterrupted_distillation(tmp_path):
    ds = _Items()
    teacher = _classifier(0)

    def run(out, student_seed, **kw):
        student = _classifier(student_seed, width=4)
        torch.manual_seed(0)
        m = DistillMethod("srrl", Teacher(teacher), student, probe=ds.images[:4])
        with m.attached(student):
            res = train(student, m, ds, _cfg(out, **kw))
        return student, m, res

    full, mf, _ = run(tmp_path / "a", 1)
    run(tmp_path / "b", 1, max_steps=3)  # stops inside epoch 2
    resumed, mr, res = run(tmp_path / "b", 7, resume=True)  # other init: everything comes from last.pt
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(mf.connector.state_dict().items(), mr.connector.state_dict().values()):
        assert torch.equal(a, b), k
    assert res["epoch"] == 2
    a_rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b_rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(a_rows[1])["train_sr"] == json.loads(b_rows[1])["train_sr"]


def test_onnx_like_teacher_is_refused_for_feature_methods():
    class Emb:
        output_kind = "embedding"
        config: dict = {}

        def __call__(self, x):
            return x.mean((2, 3))

    t = Teacher(Emb(), source="t.onnx")
    student = create_model("mobilefacenet", embedding_size=3, input_size=32)
    for kind in ("srrl", "fitnet", "at"):
        with pytest.raises(FacetoolError, match="rkd, pkt, none"):
            DistillMethod(kind, t, student, probe=torch.zeros(2, 3, 32, 32))
    with pytest.raises(FacetoolError, match="--teacher-head"):
        DistillMethod("kd", t, student, probe=torch.zeros(2, 3, 32, 32))
    DistillMethod("rkd", t, student, probe=torch.zeros(2, 3, 32, 32))  # works on embeddings


# -- the command: stores, checkpoints, recognition teachers, unlabeled data --------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 32 px synthetic store (4 ids x 6 images), a classifier teacher and an embedding teacher
    (IR-ResNet-18 width 8 with an ArcFace head in heads.pt, plus the same as backbone.pth)."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.io import torch_save
    from facetool.models.heads import MarginHead

    root = tmp_path_factory.mktemp("distill")
    prepare_synthetic(root / "s.h5", identities=4, per_identity=6, size=32, seed=0)
    prepare_synthetic(root / "u64.h5", identities=3, per_identity=2, size=64, seed=1)
    save_checkpoint(root / "teacher.pt", _classifier(0), {"method": "classify"})
    save_checkpoint(root / "teacher5.pt", _classifier(0, classes=5), {})
    torch.manual_seed(0)
    rec = root / "rec"
    rec.mkdir()
    emb = create_model("iresnet18", embedding_size=16, input_size=32, width=8)
    save_checkpoint(rec / "model.pt", emb, {"loss": "arcface", "margins": [1.0, 0.5, 0.0], "s": 64.0, "num_classes": 4})
    head = MarginHead(16, 4)
    torch_save({"head": head.state_dict()}, rec / "heads.pt")
    torch_save(emb.state_dict(), root / "backbone.pth")
    torch_save(head.weight.detach().clone(), root / "softmax_weight.pt")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return root


def _tiny_args(tiny, out, *extra):
    return ["--store", tiny / "s.h5", "--out", out, "--epochs", "1", "--batch-size", "8", "--no-amp", *extra]


def test_distill_cli_subprocess_writes_a_student_checkpoint(tiny, tmp_path):
    out = tmp_path / "srrl"
    r = run_facetool("distill", "srrl", "--teacher", tiny / "teacher.pt", "--student", "resnet18", "--width", "4",
                     *_tiny_args(tiny, out))
    assert r.returncode == 0, r.stderr
    assert "L_SR" in r.stdout and "KL(teacher‖student)" in r.stdout and "NMI" in r.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "srrl" and res["weights"] == {"gamma": 1.0, "alpha": 1.0, "beta": 1.0}
    d = res["diagnostics"]["student"]
    assert {"top1", "ce", "kl_teacher_student", "feat_dist", "nmi"} <= set(d) and d["feat_dist_of"] == "connected"
    assert {"train_ce", "train_fm", "train_sr"} <= set(res["metrics"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "distill-srrl" and cfg["method_meta"]["distill"]["weights"]["beta"] == 1.0
    student = load_model(out / "model.pt")  # a normal facetool checkpoint
    assert student.config["name"] == "resnet18" and student.config["width"] == 4
    assert set(torch.load(out / "heads.pt", weights_only=True)) == {"connector"}


def test_eval_classify_scores_teacher_and_student_side_by_side(tiny, tmp_path, cli):
    out = tmp_path / "kd"
    r = cli("distill", "kd", "--teacher", tiny / "teacher.pt", "--student", "resnet18", "--width", "4",
            *_tiny_args(tiny, out))
    assert r.exit_code == 0, r.output
    r = cli("eval", "classify", "--store", tiny / "s.h5", "--model", tiny / "teacher.pt", "--model", out / "model.pt",
            "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "t.json").read_text())["models"]
    assert [x["params_m"] > 0 for x in rows] == [True, True] and rows[0]["params_m"] > rows[1]["params_m"]


def test_recognition_teacher_with_its_head_and_backbone_pth(tiny, tmp_path, cli):
    # facetool arcface checkpoint: heads.pt beside model.pt is the teacher classifier
    out = tmp_path / "rec"
    r = cli("distill", "srrl", "--teacher", tiny / "rec" / "model.pt", "--student", "r18", "--width", "4",
            *_tiny_args(tiny, out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert res["distill"]["teacher_margin_applied"] is False and "train_sr" in res["metrics"]
    assert res["student"]["name"] == "iresnet18" and res["student"]["embedding_size"] == 16
    assert load_model(out / "model.pt").output_kind == "embedding"
    # arcface_torch backbone.pth alone: SRRL falls back to L_FM on the embedding and says so
    out2 = tmp_path / "fm_only"
    r = cli("distill", "srrl", "--teacher", tiny / "backbone.pth", "--student", "r18", "--width", "4",
            *_tiny_args(tiny, out2))
    assert r.exit_code == 0, r.output
    assert "falls back to L_FM" in r.output
    res = json.loads((out2 / "result.json").read_text())
    assert "train_fm" in res["metrics"] and "train_sr" not in res["metrics"]
    # backbone.pth + --teacher-head (a bare softmax weight tensor as arcface_torch saves it): kd works
    out3 = tmp_path / "kd_head"
    r = cli("distill", "kd", "--teacher", tiny / "backbone.pth", "--teacher-head", tiny / "softmax_weight.pt",
            "--student", "r18", "--width", "4", *_tiny_args(tiny, out3))
    assert r.exit_code == 0, r.output
    assert "train_kd" in json.loads((out3 / "result.json").read_text())["metrics"]


def test_unlabeled_store_with_mixup(tiny, tmp_path, cli):
    out = tmp_path / "u"
    r = cli("distill", "kd", "--teacher", tiny / "teacher.pt", "--student", "resnet18", "--width", "4",
            "--unlabeled", tiny / "u64.h5", "--mixup", "0.4", *_tiny_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert "holds 64 px images; resized to 32 px" in r.output
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["train_kd_unlabeled"] > 0 and "val_kd_unlabeled" not in m  # labeled validation only


def test_unlabeled_folder(tiny, tmp_path, cli):
    import cv2

    folder = tmp_path / "faces" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 40, 3), 60 * i, np.uint8))
    out = tmp_path / "uf"
    r = cli("distill", "srrl", "--teacher", tiny / "teacher.pt", "--student", "resnet18", "--width", "4",
            "--unlabeled", tmp_path / "faces", *_tiny_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert "3 images from folder" in r.output
    assert "train_kd_unlabeled" in json.loads((out / "result.json").read_text())["metrics"]


def test_transfer_probe_and_resume_flag(tiny, tmp_path, cli):
    out = tmp_path / "pkt"
    args = ["distill", "pkt", "--teacher", tiny / "teacher.pt", "--student", "resnet18", "--width", "4",
            "--transfer", tiny / "s.h5", *_tiny_args(tiny, out)]
    r = cli(*args, "--max-steps", "1")
    assert r.exit_code == 0, r.output
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    d = json.loads((out / "result.json").read_text())["diagnostics"]
    assert 0 <= d["student"]["transfer_top1"] <= 100 and 0 <= d["teacher"]["transfer_top1"] <= 100


@pytest.mark.slow
def test_torchrun_two_processes_srrl_with_unlabeled_mixup(tiny, tmp_path):
    """DDP (gloo, 2 CPU ranks): SRRL with unlabeled images and mixup; the student's second forward on
    the mixed images runs outside the DDP wrapper, the connector's gradients are all-reduced by hand.
    ~20 s (two interpreters starting torch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    script = Path(sys.executable).parent / "facetool"  # the console script torchrun starts twice
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "distill", "srrl", "--teacher", str(tiny / "teacher.pt"), "--student", "resnet18", "--width", "4",
           "--unlabeled", str(tiny / "u64.h5"), "--mixup", "0.4", "--store", str(tiny / "s.h5"), "--out", str(out),
           "--epochs", "1", "--batch-size", "4", "--no-amp"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    st = torch.load(out / "last.pt", weights_only=True)
    assert len(st["rng"]) == 2 and st["step"] == 2  # 20 training images / 2 ranks / 4 per batch
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["train_kd_unlabeled"] > 0 and math.isfinite(m["train_sr"]) and math.isfinite(m["train_fm"])
    assert set(torch.load(out / "heads.pt", weights_only=True)) == {"connector"}


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["srrl", "--teacher", "{t}/teacher5.pt", "--student", "resnet18"], "has 5 classes but store"),
    (["srrl", "--teacher", "{t}/teacher.pt", "--student", "vgg16"], "unknown --student"),
    (["srrl", "--teacher", "{t}/teacher.pt", "--student", "mobilefacenet"], "its student must be one of resnet18"),
    (["srrl", "--teacher", "{t}/s.h5", "--student", "resnet18"], "is an HDF5 file"),
    (["srrl", "--teacher", "{t}/missing.pt", "--student", "resnet18"], "teacher not found"),
    (["srrl", "--teacher", "{t}/corrupt.pt", "--student", "resnet18"], "failed to load"),
    (["crd", "--teacher", "{t}/teacher.pt", "--student", "resnet18"], "unknown distillation method"),
    (["kd", "--teacher", "{t}/backbone.pth", "--student", "r18"], "--teacher-head"),
    (["srrl", "--teacher", "{t}/teacher.pt", "--student", "resnet18", "--alpha", "-1"], "--alpha must be"),
    (["srrl", "--teacher", "{t}/teacher.pt", "--student", "resnet18", "--mixup", "0.4"], "give --unlabeled"),
    (["srrl", "--teacher", "{t}/teacher.pt", "--student", "resnet18", "--sr-loss", "l1"], "--sr-loss"),
    (["fitnet", "--teacher", "{t}/teacher.pt", "--student", "resnet18", "--hint", "layer9,layer2"], "no layer 'layer9'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, cli, args, message):
    out = tmp_path / "run"
    argv = [a.replace("{t}", str(tiny)) for a in args]
    r = cli("distill", *argv, *_tiny_args(tiny, out)[:-1])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_out_holding_the_teacher_is_refused_even_with_overwrite(tiny, cli):
    before = (tiny / "rec" / "model.pt").read_bytes()
    r = cli("distill", "srrl", "--teacher", tiny / "rec" / "model.pt", "--student", "r18", "--store", tiny / "s.h5",
            "--out", tiny / "rec", "--overwrite")
    assert r.exit_code == 2 and "holds the teacher file" in r.output
    assert (tiny / "rec" / "model.pt").read_bytes() == before


def test_onnx_teacher_for_a_feature_method_names_the_methods_that_work(tiny, tmp_path, cli):
    from facetool.export import export_onnx

    onnx = tmp_path / "t.onnx"
    export_onnx(tiny / "rec" / "model.pt", onnx)
    out = tmp_path / "run"
    r = cli("distill", "fitnet", "--teacher", onnx, "--student", "r18", *_tiny_args(tiny, out))
    assert r.exit_code == 2 and "rkd, pkt, none" in r.output and not out.exists()


def test_thesis_recipe_dry_run(cli):
    from pathlib import Path

    from facetool.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "thesis_distillation.toml"
    r = cli("recipe", str(recipe), "--dry-run")
    assert r.exit_code == 0, r.output
    _, steps = load_recipe(recipe)
    lines = [" ".join(s.argv) for s in steps]
    for kind in ("srrl", "kd", "fitnet", "at", "rkd", "pkt", "none"):
        assert any(line.startswith(f"distill {kind} ") and "--student resnet18" in line for line in lines), kind
    assert any("--student mobilefacenet" in line for line in lines)
    assert any(line.startswith("eval classify") for line in lines) and any(line.startswith("eval ijbc") for line in lines)
    _, steps = load_recipe(recipe.with_name("distill_synthetic.toml"))
    assert [s.argv[1] for s in steps if s.argv[0] == "distill"] == ["srrl", "kd", "fitnet", "at", "rkd", "pkt", "none"]


# -- learning: SRRL helps a low-label student ----------------------------------------------------------
@pytest.mark.slow
def test_srrl_student_beats_the_plain_student(tmp_path):
    """A ResNet-18 (width 16) teacher learns 16 synthetic identities from 24 images each (30 epochs,
    seed = the first learning seed, trained once); ResNet-18 students of width 8 see only the first 4
    labeled images per identity, for the same 45 epochs, batch, learning rate, schedule and seed. The SRRL
    student's test top-1 (256 test images, 16 per identity: one image = 0.4 points) beats the
    cross-entropy-only student's, averaged over three student seeds.

    Why this setting (measured, OMP_NUM_THREADS=1): the plain student's top-1 varies by seed (it fits
    4 images per identity perfectly and generalises by luck: 44-60 %), so one pair of runs is noise.
    The old setting (teacher from 12 images per identity, 15 epochs: teacher 64-77 %; 64 test images;
    students of only 60 steps) gave per-seed margins from -4.7 to +29. A teacher from 24 images per
    identity (85-88 %), 256 test images and 45 student epochs give margins of +6 to +18 per seed (mean
    +13.6 over 12 seeds, sd 4.2), so the mean of three is far from the threshold at every seed base.
    The learning rate 0.05 is the better one for the plain student (lr 0.02: 47 % instead of 54 %).

    Measured by this test (test top-1 %, SRRL vs none per seed; means; ~115 s each with 1 torch thread on
    a busy 2-core machine):
      FACETOOL_TEST_SEED=0    teacher 88.3 %:  66.0 65.2 68.4 vs 59.0 59.0 50.0 -> 66.5 vs 56.0 (+10.6)
      FACETOOL_TEST_SEED=100  teacher 84.8 %:  57.0 66.0 67.6 vs 43.0 51.2 51.2 -> 63.5 vs 48.4 (+15.1)
      FACETOOL_TEST_SEED=200  teacher 85.5 %:  66.0 62.9 65.2 vs 55.1 46.9 52.0 -> 64.7 vs 51.3 (+13.4)
    The test asks for +5 points on the mean (2.1x to 3x below the measured margins; the mean of three
    has sd ~2.4, so +5 is ~3.5 sd below the expected +13.6)."""
    from conftest import learning_seeds
    from facetool.data.synthetic import prepare_synthetic
    from facetool.trainers.classify import ClassificationMethod, train_on_store
    from facetool.trainers.distill import distill

    store = tmp_path / "s.h5"
    prepare_synthetic(store, identities=16, per_identity=40, size=64, seed=0, test_fraction=0.4)
    seeds = learning_seeds(3)
    teacher = tmp_path / "teacher"
    train_on_store(store, "resnet18", lambda m: ClassificationMethod(),
                   TrainConfig(out=teacher, epochs=30, batch_size=32, lr=0.05, seed=seeds[0], val_every=30,
                               verbose=False), model_kwargs={"width": 16})
    top1: dict[str, list[float]] = {"srrl": [], "none": []}
    teacher_top1 = None
    for seed in seeds:
        for kind in top1:
            r = distill(kind, store=store, student="resnet18", width=8, teacher=teacher / "model.pt",
                        labeled_per_identity=4,
                        cfg=TrainConfig(out=tmp_path / f"{kind}{seed}", epochs=45, batch_size=16, lr=0.05, seed=seed,
                                        val_every=45, verbose=False))
            top1[kind].append(r["diagnostics"]["student"]["top1"])
            teacher_top1 = r["diagnostics"]["teacher"]["top1"]
    srrl, none = float(np.mean(top1["srrl"])), float(np.mean(top1["none"]))
    print(f"teacher {teacher_top1:.1f} %; SRRL vs none test top-1 per seed {seeds}: {top1['srrl']} vs {top1['none']}; "
          f"means {srrl:.2f} vs {none:.2f} (+{srrl - none:.2f})")
    assert srrl - none >= 5.0, (top1, srrl, none)


def test_teacher_arch_option(tiny, tmp_path, cli):
    """`distill --teacher` had no --arch (the README promises it on every command with a model file):
    --teacher-arch names the architecture of a teacher file that records none, must agree with one that
    does, and is refused without --teacher."""
    out = tmp_path / "ta"
    r = cli("distill", "kd", "--teacher", tiny / "teacher.pt", "--teacher-arch", "iresnet34", "--student", "resnet18",
            *_tiny_args(tiny, out))
    assert r.exit_code == 2 and "resnet18; --teacher-arch iresnet34 contradicts it" in r.output, r.output
    assert not (out / "model.pt").exists()
    r = cli("distill", "none", "--teacher-arch", "resnet18", "--student", "resnet18", *_tiny_args(tiny, out))
    assert r.exit_code == 2 and "--teacher-arch names the architecture of --teacher; give --teacher too" in r.output
    r = cli("distill", "srrl", "--teacher", tiny / "backbone.pth", "--teacher-arch", "iresnet18", "--student", "r18",
            "--width", "4", *_tiny_args(tiny, out))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["method"] == "distill-srrl"


def test_a_weight_with_no_term_is_refused_not_ignored():
    from facetool.errors import FacetoolError
    from facetool.trainers.distill import resolve_weights

    with pytest.raises(FacetoolError, match="--beta weighs no term of kd"):
        resolve_weights("kd", beta=5.0)
    with pytest.raises(FacetoolError, match="--alpha weighs no term of none"):
        resolve_weights("none", alpha=1.0)
    assert resolve_weights("kd", beta=0.0)["beta"] == 0.0 and resolve_weights("srrl", beta=2.0)["beta"] == 2.0


# -- distill srrl --plus kd|at (issue 21: thesis Table 4.8, KD+Ours / AT+Ours) -------------------------------------
@pytest.mark.parametrize("plus", ["kd", "at"])
def test_srrl_plus_is_the_sum_of_srrl_and_the_baseline_term(plus):
    """On a hand-built batch, SRRL+KD (+AT) has exactly SRRL's terms (same connector) plus the baseline's own term
    at its standard weight: 0.9 x KL(T=4) of the student's logits to the teacher's, or 1000 x the attention loss of
    the four stages; the baseline's term is computed here by its own function."""
    from facetool.trainers.distill.losses import at_loss, kd_loss

    teacher, student = _classifier(0), _classifier(1, width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    base = DistillMethod("srrl", Teacher(teacher), student, probe=x)
    both = DistillMethod("srrl", Teacher(teacher), student, probe=x, plus=plus)
    both.connector.load_state_dict(base.connector.state_dict())
    t0, t1 = _run_loss(base, student, x, y), _run_loss(both, student, x, y)
    with torch.no_grad():
        logits_t = teacher(x)
    if plus == "kd":
        extra = 0.9 * kd_loss(student(x), logits_t, 4.0)
    else:
        from facetool.hooks import taps

        names = list(student.layer_names)
        with taps(student, names) as fs, taps(teacher, names) as ft:
            student(x), teacher(x)
        extra = 1000.0 * at_loss([fs[n] for n in names], [ft[n] for n in names])
    assert set(t1) == set(t0) | {f"plus_{plus}"}
    for k in t0:
        assert torch.allclose(t1[k], t0[k])
    assert torch.allclose(t1[f"plus_{plus}"], extra, rtol=1e-5)
    assert torch.allclose(sum(t1.values()), sum(t0.values()) + extra, rtol=1e-5)
    assert both.meta()["distill"]["plus"] == plus and both.name == f"distill-srrl+{plus}"


def test_plus_only_with_srrl():
    from facetool.trainers.distill.losses import check_plus

    with pytest.raises(FacetoolError, match="goes with distill srrl"):
        check_plus("kd", "at")
    with pytest.raises(FacetoolError, match="unknown --plus"):
        check_plus("srrl", "fitnet")
