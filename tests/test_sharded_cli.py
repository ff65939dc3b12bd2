"""Sharded long jobs under ``torchrun --nproc_per_node=2`` (gloo): every command's outputs equal its
one-process run on the same inputs (the done-when of issue 20, item 3). Fixtures are tiny so that each
test's two-process start-up dominates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_facetool
from facetool.models import create_model, save_checkpoint
from fixtures_ijb import make_ijb, write_bin


def torchrun(*args, cwd=None, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N facetool ARGS`` (gloo: no GPU in tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FACETOOL_DEBUG", None)
    script = Path(sys.executable).parent / "facetool"  # the console script torchrun starts N times
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Path:
    """A tiny IR-ResNet-18 (32-d, 32 px input) saved as a facetool checkpoint (any fresh process loads it)."""
    torch.manual_seed(0)
    m = create_model("iresnet18", width=8, embedding_size=32, input_size=32)
    with torch.no_grad():  # trained-looking BatchNorm statistics: embeddings that differ between faces
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(tmp_path_factory.mktemp("embedder") / "emb.pt", m)


def _h5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


def _result(folder: Path) -> dict:
    return json.loads(next(q for q in folder.glob("*.json") if not q.name.startswith(".")).read_text())


@pytest.mark.slow  # ~55 s on the shared 2-core machine (two torchrun processes + one plain run)
def test_eval_ijbc_two_processes_equal_one(embedder, tmp_path):
    """IJB-C with a feature cache: 2 ranks split the batches (31 images, batch 8: 4 batches), rank 0 writes the
    cache and the results; the cached features are bit-identical and the TARs identical to one process."""
    root = tmp_path / "IJB"
    make_ijb(root, identities=3, templates_per_id=2, seed=1)
    common = ["--root", root, "--model", embedder, "--workers", "0", "--batch-size", "8", "--device", "cpu"]
    one = run_facetool("eval", "ijbc", *common, "--cache", tmp_path / "c1.h5", "--out", tmp_path / "o1", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("eval", "ijbc", *common, "--cache", tmp_path / "c2.h5", "--out", tmp_path / "o2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("IJB-C 1:1") == 1  # rank 0 alone reports
    a, b = _result(tmp_path / "o1"), _result(tmp_path / "o2")
    assert a["images"] == b["images"] == b["images_extracted"] > 16
    assert a["tar_at_far"] == b["tar_at_far"] and a["pairs"] == b["pairs"]
    ca, cb = _h5(tmp_path / "c1.h5"), _h5(tmp_path / "c2.h5")
    assert ca.keys() == cb.keys() and len(ca) == 2 and all(np.array_equal(ca[k], cb[k]) for k in ca)
    assert not (tmp_path / "c2.h5.partial").exists()
    assert len(np.unique(ca[next(iter(ca))].round(4), axis=0)) > 16  # the features differ between faces


@pytest.mark.slow  # ~60 s on the shared 2-core machine
def test_eval_lfw_bin_two_processes_equal_one(embedder, tmp_path):
    """A 12-pair .bin pack (24 images, batch 5: 5 batches, one padded duplicate on rank 1): same accuracy, same
    distances (the ROC PNG aside, the JSON is identical)."""
    import cv2

    rng = np.random.default_rng(0)
    bins = [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes() for _ in range(24)]
    pack = write_bin(tmp_path / "lfw.bin", bins, [i % 2 == 0 for i in range(12)])
    common = ["--bin", pack, "--model", embedder, "--workers", "0", "--batch-size", "5", "--device", "cpu"]
    one = run_facetool("eval", "lfw", *common, "--out", tmp_path / "o1", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("eval", "lfw", *common, "--out", tmp_path / "o2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("lfw verification") == 1  # rank 0 alone reports
    a, b = _result(tmp_path / "o1"), _result(tmp_path / "o2")
    for r in (a, b):
        r.pop("roc_png")
    assert a == b and a["pairs"] == 12


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """20 synthetic 64-px faces with part masks and attributes (4 identities x 5)."""
    from facetool.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("shard_store") / "s.h5"
    prepare_synthetic(out, identities=4, per_identity=5, size=64, seed=3)
    return out


def _without_timing(x):
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in ("timing", "device")}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


@pytest.mark.slow  # ~40 s on the shared 2-core machine
def test_dissect_units_two_processes_equal_one(small_store, tmp_path):
    """20 images, batch 6 (4 batches, 2 per rank): the IoU pass split over 2 ranks and merged on rank 0 gives
    the same tally.csv (bytes) and dissection.json (timings aside) as one process."""
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18", num_classes=2, input_size=64, width=8).eval())
    common = ["--model", model, "--store", small_store, "--layers", "layer2,layer3", "--quantile", "0.05",
              "--batch-size", "6", "--device", "cpu"]
    one = run_facetool("dissect", "units", *common, "--out", tmp_path / "d1", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("dissect", "units", *common, "--out", tmp_path / "d2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    assert (tmp_path / "d1" / "tally.csv").read_bytes() == (tmp_path / "d2" / "tally.csv").read_bytes()
    a, b = (json.loads((tmp_path / d / "dissection.json").read_text()) for d in ("d1", "d2"))
    assert _without_timing(a) == _without_timing(b)
    assert sum(c["units"] for c in a["counts"]["r18"].values()) == 16 + 32


@pytest.mark.slow  # ~30 s on the shared 2-core machine
def test_prepare_folder_two_processes_equal_one(tmp_path):
    """A folder of 5 identities x 4 aligned images (one unreadable file, a counted skip): 2 ranks each process
    10 items, rank 0 writes them in order; images, labels, names, split and counters equal one process's store."""
    import cv2

    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for c in range(5):
        (root / f"id{c}").mkdir(parents=True)
        for k in range(4):
            cv2.imwrite(str(root / f"id{c}" / f"{k}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (root / "id2" / "3.png").write_bytes(b"not an image")
    common = ["prepare", "folder", root, "--aligned", "--size", "32", "--min-images", "1"]
    one = run_facetool(*common, "--out", tmp_path / "a.h5", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*common, "--out", tmp_path / "b.h5", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _h5(tmp_path / "a.h5"), _h5(tmp_path / "b.h5")
    assert a.keys() == b.keys() and len(a["images"]) == 19
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k
    import h5py

    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert fa.attrs["counters"] == fb.attrs["counters"] and "1" in str(fa.attrs["counters"])


def _same_store(a: Path, b: Path, images: int) -> None:
    """Two stores hold the same arrays (images, labels, names, split, ...) and the same skip counters."""
    import h5py

    ha, hb = _h5(a), _h5(b)
    assert ha.keys() == hb.keys() and len(ha["images"]) == images
    for k in ha:
        assert np.array_equal(ha[k], hb[k], equal_nan=ha[k].dtype.kind == "f"), k
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa.attrs["counters"] == fb.attrs["counters"]


@pytest.mark.slow  # ~35 s on the shared 2-core machine
def test_prepare_rec_two_processes_equal_one(tmp_path):
    """A shuffled 20-image pack (labels from the headers, 3 multi-part records), 3 identities x at most 4 images
    drawn (12 items, 6 per rank): rank 0 writes the same store (pixels, labels, split, sources) as one process."""
    import cv2
    from test_recordio import IDS, PER, _face, write_shuffled_pack

    root = tmp_path / "faces"
    for i in range(IDS):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(PER):
            cv2.imwrite(str(root / f"id{i}" / f"{k}.png"), _face(i, k)[:, :, ::-1])
    write_shuffled_pack(root, tmp_path / "train.rec")
    common = ["prepare", "rec", "--rec", tmp_path / "train.rec", "--identities", 3, "--per-identity", 4, "--seed", 1]
    one = run_facetool(*common, "--out", tmp_path / "a.h5", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*common, "--out", tmp_path / "b.h5", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_store(tmp_path / "a.h5", tmp_path / "b.h5", 12)
    ra, rb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert {k: v for k, v in ra.items() if k != "store"} == {k: v for k, v in rb.items() if k != "store"}


@pytest.mark.slow  # ~35 s on the shared 2-core machine
def test_prepare_imdbface_two_processes_equal_one(tmp_path):
    """The IMDb-Face fixture (21 CSV rows, a corrupt file replaced, unreadable identities dropped after reading):
    2 ranks give the same store and the same drop counters as one process."""
    from test_imdbface import make_imdb

    root = tmp_path / "images"
    make_imdb(root)
    common = ["prepare", "imdb-face", "--root", root, "--min-images", 3, "--per-identity", 5]
    one = run_facetool(*common, "--out", tmp_path / "a.h5", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(*common, "--out", tmp_path / "b.h5", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("unreadable") == one.stdout.count("unreadable") >= 1  # rank 0 alone reports
    _same_store(tmp_path / "a.h5", tmp_path / "b.h5", 10)


@pytest.mark.slow  # ~40 s on the shared 2-core machine
def test_dissect_relevance_two_processes_equal_one(small_store, tmp_path):
    """LRP maps of 14 images in batches of 4 (4 batches, 2 per rank) and 3 x 4 x 14 perturbed forwards in batches
    of 64 split over the ranks: rank 0 alone writes, and maps.h5 (maps, classes, curves, means), curves.csv,
    parts.csv and metrics.json (speed and paths aside) equal one process's."""
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18", num_classes=4, input_size=64, width=8).eval())
    common = ["--model", model, "--store", small_store, "--split", "all", "--limit", "14", "--batch-size", "4",
              "--steps", "3", "--patch", "8", "--grid", "4", "--target", "predicted", "--device", "cpu"]
    one = run_facetool("dissect", "relevance", *common, "--out", tmp_path / "r1", cwd=tmp_path,
                       env={"OMP_NUM_THREADS": "1"})  # one thread, as each torchrun process: the same float sums
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("dissect", "relevance", *common, "--out", tmp_path / "r2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    a, b = _h5(tmp_path / "r1" / "maps.h5"), _h5(tmp_path / "r2" / "maps.h5")
    assert a.keys() == b.keys() and a["maps"].shape == (14, 64, 64) and "explained_class" in a
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]
    assert np.abs(a["maps"]).sum((1, 2)).min() > 0  # real maps, not zeros
    for name in ("curves.csv", "parts.csv"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("r1", "r2"))
    for m in (ma, mb):
        for k in ("maps_per_second", "files"):
            m.pop(k)
    assert ma == mb and ma["images"] == 14


@pytest.mark.slow  # ~50 s on the shared 2-core machine
def test_invert_routing_prior_two_processes_equal_one(small_store, tmp_path):
    """A CondFace model, 6 faces in batches of 2 (3 batches: 2 on rank 0, 1 on rank 1), inverted without and with
    the routing prior (both inversions sharded): rank 0 alone writes, and inverted.h5 (pixels) and metrics.json
    (both inversions' metrics and final losses; the time aside) equal one process's."""
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "cf.pt", create_model("condface_ir18", input_size=64, width=8,
                                                             embedding_size=16).eval())
    common = ["--model", model, "--images", small_store, "--split", "all", "--limit", "6", "--batch", "2",
              "--iterations", "4", "--routing-prior", "10", "--pairs"]
    # one thread as each torchrun process has: the backward passes' float sums then run in the same order
    one = run_facetool("invert", *common, "--out", tmp_path / "i1", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("invert", *common, "--out", tmp_path / "i2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    a, b = _h5(tmp_path / "i1" / "inverted.h5"), _h5(tmp_path / "i2" / "inverted.h5")
    assert a.keys() == b.keys() and len(a["images"]) == 6
    assert all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("i1", "i2"))
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb and ma["images"] == 6 and "pair_accuracy" in ma["routing_prior_comparison"]["without"]
    assert not list((tmp_path / "i2").rglob("state-*.pt"))  # the resume states are cleaned up as in one process
