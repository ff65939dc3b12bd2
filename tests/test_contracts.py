"""The contracts of CONTRACTS.md: ``output_kind`` (what a model returns) apart from the task (what a
classifier predicts), the task stored once in checkpoints and read by one function (0.2.1 checkpoints
included), and ``open_dataset`` as the one way commands open a face source."""

from __future__ import annotations

import ast
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.models import FaceModel, create_model, load_model
from facetool.store import Record, StoreWriter
from facetool.tasks import Task, task_of

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "facetool"
TASK = Task("attributes", ["gender", "age"], [2, 3], [["f", "m"], ["young", "mid", "old"]])


def small_store(path: Path, size: int = 32) -> Path:
    """8 images of 4 identities with a per-image ``gender`` and a per-identity ``age``; odd rows are test."""
    w = StoreWriter(path, image_size=(size, size), identities=[f"id{k}" for k in range(4)],
                    attribute_values={"gender": ["f", "m"]},
                    identity_attributes={"age": (["young", "mid", "old"], [0, 1, 2, 1])})
    rng = np.random.default_rng(0)
    for row in range(8):
        w.append(Record(image=rng.integers(0, 255, (size, size, 3), dtype=np.uint8), label=row // 2,
                        split=row % 2, source=f"{row}.jpg", attributes={"gender": (row // 2) % 2}))
    w.finalize()
    return path


def test_contracts_md_has_the_sections_the_code_cites():
    text = (ROOT / "CONTRACTS.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (.+)$", text, re.M))
    assert {"Models", "Tasks", "Checkpoints", "Training methods", "Face sources", "Explainers"} <= sections
    cited = []
    for p, src in _sources():
        cited += [(p, c) for c in re.findall(r'CONTRACTS\.md`*,?\s+(?:sections?\s+)?"([^"]+)"', src)]
        cited += [(p, c) for c in re.findall(r'CONTRACTS\.md[^"\n]*"[^"]+" and "([^"]+)"', src)]
    assert cited and all(c in sections for _, c in cited), [(str(p), c) for p, c in cited if c not in sections]
    assert "facetool/explainers/__init__.py" in {str(p.relative_to(ROOT)) for p, _ in cited}


# -- output_kind: what forward returns ---------------------------------------------------------------
def test_output_kind_of_the_models():
    from facetool.models.features import PooledFeatures, is_classifier

    clf = create_model("resnet18", num_classes=3, input_size=32, width=8)
    emb = create_model("iresnet18", embedding_size=16, input_size=32, width=8)
    assert clf.output_kind == "classification" and is_classifier(clf)
    assert create_model("resnet18", num_classes=0, input_size=32, width=8).output_kind == "embedding"
    assert emb.output_kind == "embedding" and not is_classifier(emb)
    assert create_model("mobilefacenet", embedding_size=16, input_size=32).output_kind == "embedding"
    assert PooledFeatures(clf).output_kind == "embedding"


def test_task_alias_warns_and_follows_output_kind():
    m = create_model("iresnet18", embedding_size=16, input_size=32, width=8)
    with pytest.warns(DeprecationWarning, match="output_kind"):
        assert m.task == "embedding"
    with pytest.warns(DeprecationWarning):
        m.task = "classification"  # a 0.2.1 script setting it
    assert m.output_kind == "classification"

    with pytest.warns(DeprecationWarning, match="Legacy.task"):
        class Legacy(FaceModel):  # a 0.2.1 model class: ``task = "embedding"`` declared what it returns
            task = "embedding"
    assert Legacy().output_kind == "embedding"


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PKG.rglob("*.py"))]


def test_facetool_does_not_use_the_task_alias():
    """``model.task`` is kept for users' scripts only; facetool reads ``output_kind``."""
    bad = []
    for p, text in _sources():
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"getattr\([^,]+,\s*[\"']task[\"']", line) or re.search(r"\.task\s*[!=]=\s*[\"']", line):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "use output_kind, not the deprecated task alias:\n" + "\n".join(bad)


def test_output_kind_reaches_the_readers():
    """A model declaring ``output_kind`` is what the commands see (a classifier refused as embedder, ...)."""
    from facetool.eval.classification import check_classifier
    from facetool.explainers.relevance.targets import Target, check_target
    from facetool.models.features import select_features

    emb = create_model("iresnet18", embedding_size=16, input_size=32, width=8)
    clf = create_model("resnet18", num_classes=3, input_size=32, width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # nothing below touches the alias
        with pytest.raises(FacetoolError, match="embedding model"):
            check_classifier(emb, 3)
        check_classifier(clf, 3)
        with pytest.raises(FacetoolError, match="is a classifier"):
            select_features(clf, "embedding")
        assert select_features(emb, "embedding") is emb
        with pytest.raises(FacetoolError, match="needs an embedding model"):
            check_target(clf, Target("cosine"))
        check_target(emb, Target("cosine"))


# -- the task: one stored copy, one reader -----------------------------------------------------------
def test_one_reader_of_the_stored_task():
    """Only facetool.tasks (task_of / record_task) and the checkpoint loader look up a ``"task"`` key of a
    model's config or meta; every other reader calls task_of."""
    allowed = {PKG / "tasks.py", PKG / "models" / "checkpoint.py"}
    bad = []
    for p, text in _sources():
        if p in allowed:
            continue
        for node in ast.walk(ast.parse(text)):
            key = None
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key, of = node.slice.value, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("get", "pop") and node.args and isinstance(node.args[0], ast.Constant)):
                key, of = node.args[0].value, node.func.value
            if key == "task" and re.search(r"config|cfg|meta", ast.unparse(of)):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "read the task with facetool.tasks.task_of:\n" + "\n".join(bad)


def _checkpoint_0_2_1(model, task: dict | None, in_config: bool = True, in_meta: bool = True) -> dict:
    """A checkpoint laid out exactly as facetool 0.2.1 wrote it (engine.train -> save_checkpoint at 0bca6af):
    the task in ``config["task"]`` (train_on_store) and again in ``meta["task"]`` (ClassificationMethod.meta)."""
    config = dict(model.config)
    if task is not None and in_config:
        config["task"] = task
    meta = {"method": "classify"}
    if task is not None and in_meta:
        meta.update(task=task, class_stats={"gender": {"counts": {"f": 2, "m": 2}, "unknown": 0, "majority": "f",
                                                       "majority_code": 0, "majority_share": 0.5}})
    meta.update(metrics={"epoch": 1, "train_loss": 1.5, "val_attr_acc": 0.5}, epochs_done=1,
                train={"out": "runs/x", "epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 0, "milestones": [],
                       "extra": {}})
    return {"format": "facetool-checkpoint", "version": 1, "config": config,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}


@pytest.mark.parametrize("where", ["both", "meta only"])
def test_a_0_2_1_checkpoint_loads_with_its_task(tmp_path, where):
    from facetool.explainers.relevance.targets import attribute_slice
    from facetool.explainers.units.dissect import prediction_heads

    m = create_model("resnet18", num_classes=TASK.num_outputs, input_size=32, width=8)
    torch.save(_checkpoint_0_2_1(m, TASK.to_json(), in_config=where == "both"), tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert task_of(back) == TASK and back.config["task"] == TASK.to_json()
    assert back.output_kind == "classification"
    assert attribute_slice(back, "age") == slice(2, 5)
    assert [h[0] for h in prediction_heads(back)] == ["gender (predicted)", "age (predicted)"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), m.eval()(x))

    plain = create_model("resnet18", num_classes=4, input_size=32, width=8)
    torch.save(_checkpoint_0_2_1(plain, None), tmp_path / "p.pt")
    assert task_of(load_model(tmp_path / "p.pt")) == Task("identity", ["identity"], [4], [])


def test_trained_checkpoint_stores_the_task_once(tmp_path):
    from facetool.engine import TrainConfig
    from facetool.tasks import resolve_task
    from facetool.trainers.classify import ClassificationMethod, train_on_store

    store = small_store(tmp_path / "s.h5")
    task = resolve_task("attributes", store)
    cfg = TrainConfig(out=tmp_path / "run", epochs=1, batch_size=4, lr=0.01, amp=False, verbose=False, max_steps=1)
    train_on_store(store, "resnet18", lambda model: ClassificationMethod(), cfg, task=task, model_kwargs={"width": 8})
    raw = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert raw["config"]["task"] == task.to_json()
    assert "task" not in raw["meta"] and "class_stats" in raw["meta"]
    assert task_of(load_model(tmp_path / "run" / "model.pt")) == task


def test_a_method_given_a_task_records_it_in_the_config(tmp_path):
    """engine.train with ClassificationMethod(task) on a model without one: the task still reaches the
    checkpoint (config only)."""
    from facetool.data import FaceDataset
    from facetool.engine import TrainConfig, train
    from facetool.tasks import resolve_task
    from facetool.trainers.classify import ClassificationMethod

    store = small_store(tmp_path / "s.h5")
    task = resolve_task("attribute:gender", store)
    model = create_model("resnet18", num_classes=task.num_outputs, input_size=32, width=8)
    ds = FaceDataset(store, "train", attributes=task.names)
    cfg = TrainConfig(out=tmp_path / "run", epochs=1, batch_size=4, lr=0.01, amp=False, verbose=False, max_steps=1)
    train(model, ClassificationMethod(task, [0]), ds, cfg)
    raw = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert raw["config"]["task"] == task.to_json() and "task" not in raw["meta"]


# -- open_dataset: the one way to open a face source -----------------------------------------------
def test_open_dataset_on_a_store_is_the_face_dataset(tmp_path):
    from facetool.data import FaceDataset, open_dataset

    store = small_store(tmp_path / "s.h5")
    for split, kw in [("train", {}), ("test", {"attributes": ["gender", "age"], "size": 8}),
                      (None, {"indices": [5, 1]})]:
        a, b = open_dataset(store, split, **kw), FaceDataset(store, split, **kw)
        assert type(a) is FaceDataset and len(a) == len(b) and np.array_equal(a.indices, b.indices)
        assert a.num_classes == b.num_classes and a.attr_values == b.attr_values
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    other = tmp_path / "faces.store"  # a store under another name is still a store (HDF5 inside)
    shutil.copy(store, other)
    assert len(open_dataset(other, "train")) == 4


def test_open_dataset_refuses_what_is_no_face_source(tmp_path):
    from facetool.data import open_dataset

    (tmp_path / "notes.txt").write_text("not faces\n")
    (tmp_path / "folder").mkdir()
    for path, says in [(tmp_path / "notes.txt", "is not a face source"), (tmp_path / "missing.txt", "no such file"),
                       (tmp_path / "folder", "is a folder")]:
        with pytest.raises(FacetoolError) as e:
            open_dataset(path, "train")
        msg = str(e.value)
        assert "\n" not in msg and says in msg and msg.startswith(f"--store {path}")
        assert "a face source is a facetool face store (.h5, written by `facetool prepare`)" in msg
    with pytest.raises(FacetoolError, match="--unlabeled"):
        open_dataset(tmp_path / "notes.txt", None, option="--unlabeled")
    with pytest.raises(FacetoolError, match="face store not found"):  # a missing .h5: the store's own message
        open_dataset(tmp_path / "missing.h5", "train")


def test_commands_refuse_a_non_store_in_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not faces\n")
    m = create_model("resnet18", num_classes=4, input_size=32, width=8)
    from facetool.models import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", m)
    r = run_facetool("eval", "classify", "--store", notes, "--model", tmp_path / "m.pt", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--store" in r.stderr and "not a face store" in r.stderr
