"""`train arcface --partial-fc RATE` under torchrun (2 gloo processes): per-rank head shards, one merged head
in heads.pt, a resume on another number of processes refused in one line, and `export` / `eval lfw` of the
checkpoint (which never need the head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_facetool

from fixtures_ijb import write_bin
from facetool.models.heads import MarginHead

TINY = ["--network", "r18", "--width", "4", "--input-size", "32", "--embedding-size", "8", "--batch-size", "4",
        "--loss", "cosface", "--lr", "0.05"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path_factory.mktemp("pfc") / "s.h5", identities=5, per_identity=6, size=32, seed=0)
    return path


def _torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    env.pop("FACETOOL_DEBUG", None)
    script = Path(sys.executable).parent / "facetool"  # the console script torchrun starts twice
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _lfw_pack(store: Path, path: Path) -> Path:
    from facetool.store import FaceStore

    with FaceStore(store) as s:
        labels = np.asarray(s.labels)
        rows = [int(np.flatnonzero(labels == c)[k]) for c in range(5) for k in range(4)]
        imgs = dict(zip(rows, s.images(rows)))
    bins, issame = [], []
    for p in range(10):  # 5 genuine, 5 impostor pairs
        a = rows[2 * p]
        b = rows[2 * p + 1] if p % 2 == 0 else rows[(2 * p + 5) % len(rows)]
        for i in (a, b):
            bins.append(cv2.imencode(".jpg", cv2.cvtColor(imgs[i], cv2.COLOR_RGB2BGR))[1].tobytes())
        issame.append(bool(labels[a] == labels[b]))
    return write_bin(path, bins, issame)


@pytest.mark.slow  # two torchrun processes, then export and eval: ~60 s on this machine
def test_train_arcface_partial_fc_on_two_gloo_processes_then_export_and_eval(tiny_store, tmp_path):
    run = tmp_path / "run"
    r = _torchrun("train", "arcface", "--store", tiny_store, "--out", run, "--partial-fc", "0.5", "--epochs", "2",
                  *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["meta"]["partial_fc"] == 0.5 and ck["meta"]["sharded"] == {"world": 2, "modules": ["head"]}
    classes = ck["meta"]["num_classes"]
    shards = [torch.load(run / f"heads.rank{r}.pt", weights_only=True)["head"]["weight"] for r in range(2)]
    assert [s.shape[0] for s in shards] == [(classes + 1) // 2, classes // 2] and shards[0].shape[1] == 8
    merged = torch.load(run / "heads.pt", weights_only=True)["head"]
    assert torch.equal(merged["weight"], torch.cat(shards))
    head = MarginHead(8, classes, (1.0, 0.0, 0.4))
    head.load_state_dict(merged)  # the merged head is a full margin head
    parts = [torch.load(run / f"last.rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(p["optimizer"]["state"] for p in parts)  # each shard's momentum stays with its rank
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(x["train_loss"]) and np.isfinite(x["val_loss"]) for x in rows)

    # one process cannot continue a run whose head is split in two
    r = run_facetool("train", "arcface", "--store", tiny_store, "--out", run, "--partial-fc", "0.5", "--epochs", "3",
                     "--resume", *TINY, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "torchrun --nproc_per_node=2" in lines[0], r.stderr

    r = run_facetool("export", "--model", run / "model.pt", "--out", tmp_path / "m.onnx", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "m.onnx").stat().st_size > 0, r.stderr
    pack = _lfw_pack(tiny_store, tmp_path / "lfw.bin")
    r = run_facetool("eval", "lfw", "--bin", pack, "--model", run / "model.pt", "--out", tmp_path / "o",
                     "--workers", "0", cwd=tmp_path)
    assert r.returncode == 0 and "accuracy (%)" in r.stdout, r.stderr[-3000:]


def test_partial_fc_needs_a_margin_head(tiny_store, tmp_path):
    r = run_facetool("train", "arcface", "--store", tiny_store, "--out", tmp_path / "run", "--partial-fc", "0.5",
                     *TINY, "--loss", "softmax", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--partial-fc" in lines[0], r.stderr
    assert not (tmp_path / "run" / "model.pt").exists()


def _pack_from_store(store: Path, rec: Path) -> Path:
    """A RecordIO pack (PNG payloads, labels in the headers, no record 0) of every image of ``store``."""
    from facetool.data.recordio import IRHeader, pack, write_rec
    from facetool.store import FaceStore

    with FaceStore(store) as s:
        labels, images = np.asarray(s.labels), s.images()
        classes = s.num_classes
    recs = [(k, pack(IRHeader(0, float(labels[k]), k), cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1]
                     .tobytes())) for k, im in enumerate(images)]
    return write_rec(rec, recs, num_classes=classes, image_size=images.shape[1:3])


@pytest.mark.slow  # two torchrun processes: ~15-30 s on this machine
def test_train_arcface_on_a_pack_with_partial_fc_under_torchrun(tiny_store, tmp_path):
    """The issue's command: `train arcface --store X.rec --partial-fc 0.1` under torchrun (2 gloo processes)."""
    rec = _pack_from_store(tiny_store, tmp_path / "train.rec")
    run = tmp_path / "run"
    r = _torchrun("train", "arcface", "--store", rec, "--out", run, "--partial-fc", "0.1", "--epochs", "1", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "model.pt", weights_only=True)
    assert ck["meta"]["partial_fc"] == 0.1 and ck["meta"]["sharded"] == {"world": 2, "modules": ["head"]}
    shards = [torch.load(run / f"heads.rank{r}.pt", weights_only=True)["head"]["weight"] for r in range(2)]
    merged = torch.load(run / "heads.pt", weights_only=True)["head"]["weight"]
    assert merged.shape[0] == ck["meta"]["num_classes"] == 5 and torch.equal(merged, torch.cat(shards))
