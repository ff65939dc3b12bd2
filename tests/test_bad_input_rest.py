"""Issue 17, the remaining defects: damaged checkpoints (I6), distill's all-zero weights (I9), its inputs
checked before training (H1), non-finite teachers (U1), attribute teachers, embeddings-file shapes,
partial ``--init``, ``prepare folder`` counts, one definition of L_FM, and a truthful Ctrl-C message.

Each refusal through the CLI is exit 2, ONE line on stderr starting with ``error:``, no traceback,
nothing written and the inputs unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_facetool
from facetool.errors import FacetoolError


def _sha(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def refused(r, *needles: str) -> str:
    """The one-line refusal of a subprocess run; returns the line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    """A 32 px store (4 identities x 8 images, train and test), an identity classifier, a gender
    classifier (attribute teacher) and an embedding model (IR-ResNet-18, 16-d) with a head file, all
    width 4 and untrained (the defects are refusals before any training)."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models import create_model, save_checkpoint
    from facetool.tasks import record_task, resolve_task

    d = tmp_path_factory.mktemp("rest")
    store = d / "s.h5"
    prepare_synthetic(store, identities=4, per_identity=8, size=32, seed=0)
    torch.manual_seed(0)
    kit = {"dir": d, "store": store, "id": d / "id" / "model.pt", "gender": d / "gender" / "model.pt",
           "emb": d / "emb" / "model.pt"}
    save_checkpoint(kit["id"], create_model("resnet18", num_classes=4, input_size=32, width=4))
    g = create_model("resnet18", num_classes=2, input_size=32, width=4)
    record_task(g, resolve_task("attribute:gender", store))
    save_checkpoint(kit["gender"], g)
    save_checkpoint(kit["emb"], create_model("iresnet18", embedding_size=16, input_size=32, width=4))
    kit["head"] = d / "emb" / "head.pt"
    torch.save({"weight": torch.randn(4, 16)}, kit["head"])
    return kit


def _damaged(kit, name: str, change) -> Path:
    ck = torch.load(kit["id"], weights_only=True)
    change(ck)
    p = kit["dir"] / f"{name}.pt"
    torch.save(ck, p)
    return p


# -- I6: one loader validates a checkpoint -------------------------------------------------------------
def test_cli_checkpoint_without_config_is_named_damaged(kit, tmp_path):
    """I6: a checkpoint without `config` was "internal error: KeyError: 'config'"."""
    bad = _damaged(kit, "noconf", lambda ck: ck.pop("config"))
    before = _sha([bad, kit["store"]])
    r = run_facetool("eval", "classify", "--store", kit["store"], "--model", bad, "--json", tmp_path / "r.json")
    refused(r, f"checkpoint {bad}", "damaged", "no config")
    assert not (tmp_path / "r.json").exists() and _sha([bad, kit["store"]]) == before


def test_cli_checkpoint_input_size_0_is_blamed_on_the_file_not_on_an_option(kit, tmp_path):
    """I6: `input_size 0` in a checkpoint was blamed on `--input-size`, which the user did not type."""
    bad = _damaged(kit, "size0", lambda ck: ck["config"].update(input_size=0))
    r = run_facetool("info", bad)
    line = refused(r, str(bad), "input_size 0")
    assert "--input-size" not in line


@pytest.mark.parametrize("name,change,needle", [
    ("listconf", lambda ck: ck.update(config=[1, 2]), "config that is a list"),
    ("noneconf", lambda ck: ck.update(config=None), "no config"),
    ("noname", lambda ck: ck["config"].pop("name"), "no architecture name"),
    ("badname", lambda ck: ck["config"].update(name="resnet999"), "unknown architecture 'resnet999'"),
    ("huge", lambda ck: ck["config"].update(input_size=100000), "input_size 100000"),
    ("negative", lambda ck: ck["config"].update(input_size=-5), "input_size -5"),
    ("text", lambda ck: ck["config"].update(input_size="abc"), "input_size 'abc'"),
    ("width0", lambda ck: ck["config"].update(width=0), "width 0"),
    ("small", lambda ck: ck["config"].update(input_size=16), "does not build resnet18: input_size must be >= 32"),
    ("extra", lambda ck: ck["config"].update(foo=3), "an argument it does not take: 'foo'"),
    ("task", lambda ck: ck["config"].update(task={"kind": "colour"}), "task"),
    ("nosd", lambda ck: ck.pop("state_dict"), "no state_dict"),
    ("sdlist", lambda ck: ck.update(state_dict=[1]), "state_dict is a list"),
    ("meta", lambda ck: ck.update(meta=[1]), "meta is a list"),
    ("nan", lambda ck: ck["state_dict"]["fc.weight"].fill_(float("nan")),
     "non-finite weights (NaN or inf) in fc.weight"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file_and_the_defect(kit, name, change, needle):
    from facetool.models import load_model

    bad = _damaged(kit, name, change)
    with pytest.raises(FacetoolError) as e:
        load_model(bad)
    msg = str(e.value)
    assert str(bad) in msg and needle in msg, msg
    assert "--input-size" not in msg and "--" not in msg.replace(str(bad), ""), msg


def test_checkpoints_of_0_2_1_still_load():
    from facetool.models import load_model

    for p in sorted((Path(__file__).parent / "fixtures" / "v0_2_1").glob("*/model.pt")):
        assert load_model(p).config["name"]


# -- distill: everything checked before training ---------------------------------------------------------
def _distill(kit, tmp_path, method: str, *args):
    return run_facetool("distill", method, "--student", "resnet18", "--width", "4", "--epochs", "1",
                        "--batch-size", "8", "--store", kit["store"], "--out", tmp_path / "run", *args)


def test_cli_distill_all_loss_weights_zero_is_refused(kit, tmp_path):
    """I9: `--alpha 0 --beta 0 --gamma 0` was "internal error: stack expects a non-empty TensorList"."""
    r = _distill(kit, tmp_path, "srrl", "--teacher", kit["id"], "--alpha", "0", "--beta", "0", "--gamma", "0")
    refused(r, "--alpha 0", "--beta 0", "--gamma 0", "at least one loss weight must be > 0")
    assert not (tmp_path / "run").exists()


def test_distill_loss_needs_a_weight_the_method_uses(kit):
    """kd does not use --beta: --alpha 0 --gamma 0 --beta 3 trains nothing either."""
    from facetool.trainers.distill.method import DistillMethod
    from facetool.trainers.distill.teacher import load_teacher
    from facetool.models import create_model

    t = load_teacher(kit["id"])
    student = create_model("resnet18", num_classes=4, input_size=32, width=4)
    with pytest.raises(FacetoolError, match=r"--beta 3 .*kd uses --alpha \(KL\(T\)\), --gamma \(CE\)"):
        DistillMethod("kd", t, student, probe=torch.zeros(2, 3, 32, 32),
                      weights={"alpha": 0.0, "beta": 3.0, "gamma": 0.0})


def test_cli_distill_transfer_store_without_test_split_is_refused_before_training(kit, tmp_path):
    """H1: --transfer was read after the whole training."""
    from facetool.data.synthetic import prepare_synthetic

    no_test = tmp_path / "no_test.h5"
    prepare_synthetic(no_test, identities=3, per_identity=4, size=32, seed=1, test_fraction=0.0)
    before = _sha([no_test, kit["store"], kit["id"]])
    r = _distill(kit, tmp_path, "kd", "--teacher", kit["id"], "--transfer", no_test)
    refused(r, f"--transfer {no_test}", "no test images")
    assert "epoch" not in r.stdout and not (tmp_path / "run").exists()
    assert _sha([no_test, kit["store"], kit["id"]]) == before


def test_cli_distill_transfer_text_file_is_refused_before_training(kit, tmp_path):
    text = tmp_path / "bad.h5"
    text.write_text("not a store\n")
    r = _distill(kit, tmp_path, "kd", "--teacher", kit["id"], "--transfer", text)
    refused(r, "--transfer", str(text))
    assert "epoch" not in r.stdout and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["text", "no test split"])
def test_library_distill_reads_the_transfer_store_before_training(kit, tmp_path, monkeypatch, case):
    """H1 through the library: no training step runs before --transfer is known to be usable."""
    import facetool.trainers.distill.run as run
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig

    def no_training(*a, **k):
        raise AssertionError("training started before --transfer was checked")

    monkeypatch.setattr(run, "train", no_training)
    transfer = tmp_path / "t.h5"
    if case == "text":
        transfer.write_text("not a store\n")
    else:
        prepare_synthetic(transfer, identities=3, per_identity=4, size=32, seed=1, test_fraction=0.0)
    cfg = TrainConfig(out=tmp_path / "run", epochs=1, batch_size=8, verbose=False)
    with pytest.raises(FacetoolError, match="t.h5"):
        run.distill("kd", store=kit["store"], student="resnet18", cfg=cfg, teacher=kit["id"], width=4,
                    transfer=transfer)


def test_cli_distill_nan_teacher_head_is_refused_naming_the_file(kit, tmp_path):
    """U1: a NaN teacher head ended as "loss became nan ... lower --lr" (wrong advice)."""
    nan_head = tmp_path / "nan_head.pt"
    w = torch.randn(4, 16)
    w[1, 3] = float("nan")
    torch.save({"weight": w}, nan_head)
    r = _distill(kit, tmp_path, "kd", "--teacher", kit["emb"], "--teacher-head", nan_head)
    refused(r, f"teacher head {nan_head}", "non-finite")
    assert "--lr" not in r.stderr and not (tmp_path / "run").exists()


def test_cli_distill_teacher_with_inf_weights_is_refused_naming_the_file(kit, tmp_path):
    bad = _damaged(kit, "inf", lambda ck: ck["state_dict"]["fc.weight"].fill_(float("inf")))
    r = _distill(kit, tmp_path, "kd", "--teacher", bad)
    refused(r, str(bad), "non-finite")
    assert "--lr" not in r.stderr and not (tmp_path / "run").exists()


def test_cli_distill_nan_teacher_scale_is_refused(kit, tmp_path):
    """U1: a NaN --teacher-scale (refused by the central option check)."""
    r = _distill(kit, tmp_path, "kd", "--teacher", kit["emb"], "--teacher-head", kit["head"], "--teacher-scale", "nan")
    refused(r, "--teacher-scale")
    assert not (tmp_path / "run").exists()


def test_cli_distill_from_an_attribute_teacher_says_it_predicts_attributes(kit, tmp_path):
    """It was reported as a class-count mismatch (the gender head has 2 classes, the store 4 identities)."""
    r = _distill(kit, tmp_path, "kd", "--teacher", kit["gender"])
    line = refused(r, str(kit["gender"]), "predicts attribute gender, not identities", "train resnet without --task")
    assert "classes" not in line and not (tmp_path / "run").exists()


def test_distill_alpha_on_a_teacher_without_classifier_is_refused(kit):
    from facetool.models import create_model
    from facetool.trainers.distill.method import DistillMethod
    from facetool.trainers.distill.teacher import load_teacher

    t = load_teacher(kit["emb"])
    student = create_model("iresnet18", embedding_size=16, input_size=32, width=4)
    with pytest.raises(FacetoolError, match="--alpha weighs KL"):
        DistillMethod("rkd", t, student, probe=torch.zeros(2, 3, 32, 32),
                      weights={"alpha": 1.0, "beta": 1.0, "gamma": 1.0})


# -- invert --embeddings: the file's own shapes ---------------------------------------------------------
def test_cli_invert_embeddings_errors_report_the_files_shape_not_the_limited_one(kit, tmp_path):
    import h5py

    f = tmp_path / "emb.h5"
    with h5py.File(f, "w") as h:
        h["embeddings"] = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
        h["images"] = np.zeros((10, 64, 64, 3), np.uint8)  # the model takes 32 px
    before = _sha([f, kit["emb"]])
    r = run_facetool("invert", "--model", kit["emb"], "--embeddings", f, "--limit", "2", "--iterations", "2",
                     "--out", tmp_path / "inv")
    refused(r, str(f), "(10, 64, 64, 3)")
    assert not (tmp_path / "inv").exists() and _sha([f, kit["emb"]]) == before


def test_embeddings_file_with_fewer_labels_than_embeddings_is_refused_whatever_the_limit(tmp_path):
    import h5py

    from facetool.explainers.invert.inputs import load_inputs

    f = tmp_path / "emb.h5"
    with h5py.File(f, "w") as h:
        h["embeddings"] = np.ones((10, 16), np.float32)
        h["labels"] = np.arange(5)
    with pytest.raises(FacetoolError, match=r"'labels' must be \(N,\) = \(10,\).*got \(5,\)"):
        load_inputs(embeddings=f, limit=2, size=32)
    with h5py.File(f, "w") as h:
        h["embeddings"] = np.ones((10, 4, 4), np.float32)
    with pytest.raises(FacetoolError, match=r"got shape \(10, 4, 4\)"):
        load_inputs(embeddings=f, limit=2, size=32)


# -- train --init from another model: says what it copied ------------------------------------------------
def test_cli_train_init_says_which_tensors_were_not_copied(kit, tmp_path):
    r = run_facetool("train", "resnet", "--arch", "resnet18", "--width", "4", "--store", kit["store"], "--task",
                     "attribute:gender", "--init", kit["id"], "--epochs", "1", "--batch-size", "8",
                     "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: --init")]
    assert len(notes) == 1, r.stderr
    assert "copied 120 of its 122 tensors" in notes[0] and "fc.weight (4x32 here 2x32)" in notes[0], notes[0]
    assert "fc.bias" in notes[0] and "2 of the model's 122 tensors keep their fresh initialisation" in notes[0]


def test_init_from_an_identical_model_says_nothing(kit):
    from facetool.models import create_model
    from facetool.trainers.classify import init_from_checkpoint

    notes: list[str] = []
    assert init_from_checkpoint(create_model("resnet18", num_classes=4, input_size=32, width=4), kit["id"],
                                notes) == (122, 0)
    assert notes == []


# -- prepare folder: counts per reason when nothing is left -------------------------------------------------
def test_cli_prepare_folder_without_any_face_gives_the_counts_per_reason(tmp_path):
    import cv2

    root = tmp_path / "faces"
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(root / ident / f"{i}.jpg"), np.full((80, 80, 3), 128, np.uint8))
    (root / "a" / "broken.jpg").write_text("not an image")
    r = run_facetool("prepare", "folder", root, "--out", tmp_path / "f.h5")
    refused(r, "no face: 6", "unreadable: 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]


# -- L_FM: one definition ----------------------------------------------------------------------------------
def test_diagnostics_feature_distance_is_the_loss_l_fm(monkeypatch):
    """The loss averaged (h_T - h_S)^2 over the dimensions, the diagnostics table summed them."""
    import importlib

    from facetool.trainers.srrl import fm_loss

    diag = importlib.import_module("facetool.trainers.distill.diagnostics")  # the package re-exports the function

    t_h = np.array([[1, 2], [3, 0], [0, 0], [1, 1], [0, 2], [3, 1]], np.float32)
    s_h = np.array([[0, 1], [1, 0], [0, 0], [0, 2], [0, 0], [0, 0]], np.float32)
    # squared differences per image: 2, 4, 0, 2, 4, 10 -> 22 over 6 images x 2 dimensions
    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3, dtype=np.float32)[labels]
    monkeypatch.setattr(diag, "extract", lambda *a, **k: {"label": labels, "s_logits": logits, "s_h": s_h,
                                                          "t_h": t_h, "t_logits": logits, "s_h_connected": s_h})
    d = diag.diagnostics(object(), None, None, None, 8, torch.device("cpu"))
    assert d["student"]["feat_dist"] == pytest.approx(22 / 12)
    assert d["student"]["feat_dist"] == pytest.approx(float(fm_loss(torch.from_numpy(s_h), torch.from_numpy(t_h))))
    assert fm_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]])).item() == pytest.approx(1.0)


# -- Ctrl-C: the message says what was kept ---------------------------------------------------------------
def _interrupted(capfd, body) -> str:
    import typer

    from facetool.cli.common import guarded

    @guarded
    def command():
        body()
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 130
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: interrupted"), err
    return err


def test_interrupt_of_a_command_that_wrote_nothing_says_so(capfd):
    err = _interrupted(capfd, lambda: None)
    assert err == "error: interrupted; nothing was written"


def test_interrupt_after_complete_files_names_them_and_promises_no_resume(capfd, tmp_path):
    from facetool.io import write_json

    err = _interrupted(capfd, lambda: write_json(tmp_path / "a.json", {"x": 1}))
    assert f"kept {tmp_path / 'a.json'}" in err and "nothing is half-written" in err and "--resume" not in err


def test_cli_interrupted_prepare_says_it_kept_the_partial_store_and_resumes(cli, tmp_path, monkeypatch):
    from facetool.store import StoreWriter

    real, calls = StoreWriter.checkpoint, []

    def interrupt_on_the_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    out = tmp_path / "s.h5"
    args = ("prepare", "synthetic", "--identities", "4", "--per-identity", "3", "--size", "32", "--out", out)
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "checkpoint", interrupt_on_the_third)
        r = cli(*args)
    assert r.exit_code == 130, r.output
    assert f"kept the partial {out}.partial; rerun the same command with --resume to continue" in r.output, r.output
    assert not out.exists()
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert out.exists()
