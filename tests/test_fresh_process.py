"""Foreign checkpoints in a FRESH interpreter (issue 12): a bare arcface_torch ``backbone.pth`` works in
every headline command run as ``python -m facetool`` in a new process, where nothing has imported the
architecture modules yet; ``--arch`` for files no matcher recognises; ``--device`` checked up front."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import run_facetool
from facetool.models import create_model, save_checkpoint
from fixtures_ijb import make_ijb, write_bin  # also registers the test models (in this process only)
from test_iresnet import DEPTHS, published_layout


def _one_line_error(r, *needles: str) -> str:
    """A user error: exit 2, one line on stderr, no traceback; returns the line."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _save_backbone(path: Path, **kw) -> Path:
    """An IR-ResNet-18 saved as arcface_torch saves ``backbone.pth``: ``torch.save(backbone.state_dict())``,
    a bare state_dict in the published key layout (no facetool config)."""
    torch.manual_seed(0)
    m = create_model("iresnet18", **kw)
    with torch.no_grad():  # BatchNorm statistics of a trained net, so the embeddings are not degenerate
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    sd = m.state_dict()
    assert [k for k in sd] == [k for k, _ in published_layout(DEPTHS[18])]
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """arcface_torch's r18 exactly: keys and shapes of the published layout (24 M parameters)."""
    path = _save_backbone(tmp_path_factory.mktemp("arcface_torch") / "backbone.pth")
    sd = torch.load(path, weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == published_layout(DEPTHS[18])
    return path


@pytest.fixture(scope="module")
def narrow_backbone(tmp_path_factory) -> Path:
    """The same key layout at a quarter of the width (CPU-cheap inversion and export)."""
    return _save_backbone(tmp_path_factory.mktemp("arcface_torch_narrow") / "backbone.pth", width=16)


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijb") / "IJB"
    make_ijb(root, identities=2, templates_per_id=2, seed=0)
    return root


def test_eval_ijbc_on_a_bare_backbone(backbone, ijb_root, tmp_path):
    """The issue's done-when: `facetool eval ijbc --root IJB --model backbone.pth` prints the TAR table."""
    r = run_facetool("eval", "ijbc", "--root", ijb_root, "--model", backbone, "--out", tmp_path / "o",
                     "--workers", "0", "--batch-size", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IJB-C 1:1" in r.stdout and "TAR (closest)" in r.stdout and "1e-01" in r.stdout
    assert "model input 112 px" in r.stdout
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["images_extracted"] == res["images"] > 0 and res["input_size"] == 112
    assert all(np.isfinite(v["closest"]) for v in res["tar_at_far"].values())


def test_eval_lfw_on_a_bare_backbone(narrow_backbone, synthetic_store, tmp_path):
    from facetool.store import FaceStore

    with FaceStore(synthetic_store) as s:
        labels = np.asarray(s.labels)
        rows = [int(np.flatnonzero(labels == c)[k]) for c in range(4) for k in range(5)]
        imgs = dict(zip(rows, s.images(rows)))
    bins, issame = [], []
    for p in range(10):  # 5 genuine pairs (same identity), 5 impostor pairs
        a = rows[p * 2]
        b = rows[p * 2 + 1] if p % 2 == 0 else rows[(p * 2 + 7) % len(rows)]
        for i in (a, b):
            bins.append(cv2.imencode(".jpg", cv2.cvtColor(imgs[i], cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(bool(labels[a] == labels[b]))
    pack = write_bin(tmp_path / "lfw.bin", bins, issame)
    r = run_facetool("eval", "lfw", "--bin", pack, "--model", narrow_backbone, "--out", tmp_path / "o",
                     "--workers", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lfw verification" in r.stdout and "accuracy (%)" in r.stdout
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["pairs"] == 10 and 0.0 <= res["accuracy"] <= 1.0 and res["xnorm"] > 0


def test_invert_on_a_bare_backbone(narrow_backbone, synthetic_store, tmp_path):
    out = tmp_path / "inv"
    r = run_facetool("invert", "--model", narrow_backbone, "--images", synthetic_store, "--limit", 2, "--batch", 2,
                     "--iterations", 2, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    met = json.loads((out / "metrics.json").read_text())
    assert met["images"] == 2 and met["features"] == "embedding" and np.isfinite(met["cosine_model"])
    assert (out / "grid.png").is_file() and (out / "inverted.h5").is_file()


def test_export_on_a_bare_backbone(narrow_backbone, tmp_path):
    out = tmp_path / "r18.onnx"
    r = run_facetool("export", "--model", narrow_backbone, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["output"] == "embedding" and rep["embedding_size"] == 512 and rep["input_size"] == 112
    assert rep["config"] == {"name": "iresnet18", "embedding_size": 512, "input_size": 112, "width": 16}
    assert rep["max_abs_diff_normalised"] < 1e-4


def test_info_on_a_bare_backbone_and_arch_for_unknown_layouts(backbone, tmp_path, cli):
    r = run_facetool("info", backbone, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["model"] == "iresnet18" and info["output"] == "embedding"
    assert json.loads(info["config"]) == {"name": "iresnet18", "embedding_size": 512, "input_size": 112}

    # a layout no matcher knows (here the test model `test_mean_colour`'s weights): the error points to --arch
    bare = tmp_path / "unknown.pth"
    torch.save(create_model("test_mean_colour").state_dict(), bare)
    err = _one_line_error(run_facetool("info", bare, cwd=tmp_path), "--arch", "iresnet50", "resnet18")
    assert "cannot tell the architecture" in err
    # (the rest does not depend on import order: in-process, where the test model is registered)
    r = cli("info", bare, "--arch", "test_mean_colour", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"] == "test_mean_colour"
    r = cli("info", bare, "--arch", "nonet")
    assert r.exit_code == 2 and "unknown model 'nonet'" in r.output
    # bare ResNet / AIG classifier weights are recognised too (depth, gates, width, classes)
    torch.save(create_model("aig_resnet18", num_classes=5, width=4, input_size=32).state_dict(), tmp_path / "a.pth")
    r = cli("info", tmp_path / "a.pth", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(json.loads(r.output)["config"]) == {"name": "aig_resnet18", "num_classes": 5, "width": 4,
                                                           "gate_hidden": 16}
    # a facetool checkpoint records its architecture: a contradicting --arch is refused
    ck = save_checkpoint(tmp_path / "m.pt", create_model("iresnet18", width=4, embedding_size=8, input_size=32))
    r = cli("info", ck, "--arch", "iresnet34")
    assert r.exit_code == 2 and "facetool checkpoint of iresnet18; --arch iresnet34 contradicts it" in r.output
    assert cli("info", ck, "--arch", "iresnet18").exit_code == 0


def test_device_strings_are_checked_up_front(ijb_root, tmp_path, cli):
    ck = save_checkpoint(tmp_path / "m.pt", create_model("iresnet18", width=4, embedding_size=8, input_size=32))
    r = cli("eval", "ijbc", "--root", ijb_root, "--model", ck, "--device", "foo", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--device 'foo' is not a device; use auto, cpu" in r.output
    assert "internal error" not in r.output and not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        r = cli("eval", "lfw", "--bin", tmp_path / "none.bin", "--model", ck, "--device", "cuda")
        assert r.exit_code == 2 and "--device cuda: no CUDA device here" in r.output
