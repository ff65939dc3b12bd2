"""The training engine: schedules, exact resume, NaN guard, checkpoints, method modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from facetool.engine import Method, TrainConfig, lr_at, train
from facetool.trainers.classify import ClassificationMethod
from facetool.errors import FacetoolError, NonFiniteLossError
from facetool.models import create_model, load_model


class ToyFaces(torch.utils.data.Dataset):
    """Items like FaceDataset's: class-dependent colour + noise, 32 px."""

    def __init__(self, n: int = 24, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        base = torch.linspace(-0.8, 0.8, classes)[self.labels].view(n, 1, 1, 1)
        self.images = base + 0.3 * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("aig_resnet18", num_classes=3, input_size=32, width=8)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=out, epochs=2, batch_size=8, lr=0.05, verbose=False, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedules_hand_computed(tmp_path):
    c = TrainConfig(out=tmp_path, epochs=4, lr=0.1, warmup_epochs=1, schedule="cosine")
    # 10 steps/epoch: warm-up steps 0..9 -> 0.01 .. 0.1; then cosine over 30 steps
    assert lr_at(c, 0, 10) == pytest.approx(0.01)
    assert lr_at(c, 9, 10) == pytest.approx(0.1)
    assert lr_at(c, 25, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    c.schedule = "poly"
    assert lr_at(c, 25, 10) == pytest.approx(0.1 * 0.5**2)
    c.schedule, c.milestones, c.gamma = "step", (2, 3), 0.1
    assert lr_at(c, 19, 10) == pytest.approx(0.1)
    assert lr_at(c, 20, 10) == pytest.approx(0.01)
    assert lr_at(c, 35, 10) == pytest.approx(0.001)


def test_resume_continues_to_identical_weights(tmp_path):
    ds = ToyFaces()
    full = _model()
    train(full, ClassificationMethod(), ds, _cfg(tmp_path / "a"))  # 2 epochs x 3 steps

    part = _model()
    train(part, ClassificationMethod(), ds, _cfg(tmp_path / "b", max_steps=4))  # stops inside epoch 2
    assert not (tmp_path / "b" / "metrics.csv").read_text().count("\n2,")
    resumed = _model(seed=123)  # different init: everything must come from last.pt
    res = train(resumed, ClassificationMethod(), ds, _cfg(tmp_path / "b", resume=True))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert res["epoch"] == 2 and res["step"] == 6
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    a_rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] == pytest.approx(a_rows[1]["train_loss"], abs=0)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    ds = ToyFaces(n=8)
    train(_model(), ClassificationMethod(), ds, _cfg(tmp_path, epochs=1))
    with pytest.raises(FacetoolError, match="--resume"):
        train(_model(), ClassificationMethod(), ds, _cfg(tmp_path, epochs=1))
    train(_model(), ClassificationMethod(), ds, _cfg(tmp_path, epochs=1, overwrite=True))


class NaNAt(ClassificationMethod):
    def __init__(self, at: int) -> None:
        self.calls = 0
        self.at = at

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        self.calls += 1
        terms["margin"] = torch.tensor(float("nan") if self.calls == self.at else 0.0)
        return terms


def test_nan_guard_names_the_term(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss term 'margin' became nan at epoch 2 step 5"):
        train(_model(), NaNAt(5), ToyFaces(), _cfg(tmp_path))


def test_outputs_and_checkpoints_load_weights_only(tmp_path):
    ds = ToyFaces()
    model = _model()
    res = train(model, ClassificationMethod(), ds, _cfg(tmp_path, epochs=1), val_ds=ToyFaces(n=9, seed=1))
    for name in ["last.pt", "model.pt", "metrics.csv", "metrics.jsonl", "config.json"]:
        assert (tmp_path / name).is_file(), name
    st = torch.load(tmp_path / "last.pt", weights_only=True)
    assert st["step"] == 3 and "optimizer" in st and "rng" in st
    assert {"val_top1", "val_loss", "train_ce", "train_top1", "val_exec_rate"} - set(res) == {"val_exec_rate"}
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.meta["method"] == "classify" and loaded.meta["metrics"]["epoch"] == 1
    x = ds.images[:4]
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["name"] == "aig_resnet18"


class WithHead(Method):
    """A method with its own trainable module (like a margin head on an embedding model)."""

    name = "head"

    def __init__(self) -> None:
        self.head = nn.Linear(16, 3)

    def modules(self):
        return {"head": self.head}

    def loss(self, model, batch, out, internals):
        return {"ce": nn.functional.cross_entropy(self.head(out), batch["label"])}


def test_method_modules_are_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=0, input_size=32, width=2)  # 16-d pooled feature
    m = WithHead()
    before = m.head.weight.detach().clone()
    train(model, m, ToyFaces(), _cfg(tmp_path, epochs=1))
    assert not torch.equal(before, m.head.weight)
    heads = torch.load(tmp_path / "heads.pt", weights_only=True)
    assert torch.equal(heads["head"]["weight"], m.head.weight.detach())


def test_bad_config_is_one_line_error(tmp_path):
    with pytest.raises(FacetoolError, match="schedule"):
        train(_model(), ClassificationMethod(), ToyFaces(), _cfg(tmp_path, schedule="linear"))


def test_val_every_validates_every_nth_and_the_last_epoch(tmp_path):
    model = _model()
    res = train(model, ClassificationMethod(), ToyFaces(), _cfg(tmp_path, epochs=3, val_every=2, warmup_epochs=0),
                val_ds=ToyFaces(n=9, seed=1))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in rows] == [False, True, True] and "val_top1" in res
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs (blank val cells)
    with pytest.raises(FacetoolError, match="--val-every"):
        train(_model(), ClassificationMethod(), ToyFaces(), _cfg(tmp_path / "b", val_every=0))


class ModeSpy(WithHead):
    """A head with dropout and BatchNorm that records its mode in every loss call, by phase."""

    def __init__(self) -> None:
        self.head = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Linear(16, 3))
        self.seen: dict[bool, set[bool]] = {True: set(), False: set()}  # model.training -> head.training
        self.at_evaluate: list[bool] = []

    def loss(self, model, batch, out, internals):
        self.seen[model.training].add(self.head.training)
        return super().loss(model, batch, out, internals)

    def evaluate(self, model, epoch):
        self.at_evaluate.append(self.head.training)
        return {}


def test_method_modules_are_in_eval_mode_during_validation(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=0, input_size=32, width=2)
    m = ModeSpy()
    train(model, m, ToyFaces(), _cfg(tmp_path, epochs=2), val_ds=ToyFaces(n=10, seed=1))
    assert m.seen == {True: {True}, False: {False}}  # training steps in train mode, validation in eval mode
    assert m.at_evaluate == [False, False] and m.head.training  # and back to train mode afterwards
    running = m.head[1].running_mean.clone()
    from facetool.engine import validate

    validate(model, m, ToyFaces(n=10, seed=1), 4, torch.device("cpu"))
    assert torch.equal(m.head[1].running_mean, running) and m.head.training  # validation leaves the statistics


class Declared(ClassificationMethod):
    def metrics(self, batch, out, internals):
        return {"top1": 0.5, "foo_a": 0.25, "foo_b": 0.125, "exec_rate": 1.0}

    def log_keys(self):
        return ("epoch", "train_foo*")


def test_epoch_line_prints_the_keys_the_method_declares(tmp_path, capsys):
    train(_model(), Declared(), ToyFaces(), _cfg(tmp_path, epochs=1, log_every=0, verbose=True),
          val_ds=ToyFaces(n=9, seed=1))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert lines == ["epoch 1  train_foo_a 0.25  train_foo_b 0.125"]  # not val_exec_rate, val_top1 ...


def test_aig_epoch_line_keeps_its_text(tmp_path, capsys):
    from facetool.trainers.aig import AIGMethod

    train(_model(), AIGMethod([1.0] * 8), ToyFaces(), _cfg(tmp_path, epochs=1, log_every=0, verbose=True),
          val_ds=ToyFaces(n=9, seed=1))
    err = capsys.readouterr().err
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    keys = ["epoch", "train_loss", "train_top1", "val_top1", "val_exec_rate"]
    line = "  ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys)
    assert err[err.index("epoch 1"):].split() == line.split()  # (wrapped at the console's 80 columns)


def test_result_summary_comes_from_the_method(tmp_path):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.trainers.aig import AIGMethod
    from facetool.trainers.classify import train_on_store

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=3, per_identity=4, size=32, seed=0)

    class Summed(ClassificationMethod):
        def summary(self, model, final):
            return {"own": final["epoch"], **super().summary(model, final)}

    res = train_on_store(store, "resnet18", lambda m: Summed(), _cfg(tmp_path / "r", epochs=1), model_kwargs={"width": 2})
    on_disk = json.loads((tmp_path / "r" / "result.json").read_text())
    assert on_disk["own"] == res["own"] == 1 and on_disk["gated_blocks"] == 0 and "exec_gflops" not in on_disk
    res = train_on_store(store, "aig_resnet18", lambda m: AIGMethod([1.0] * 8), _cfg(tmp_path / "a", epochs=1),
                         model_kwargs={"width": 2})
    from facetool.flops import executed_flops

    model = load_model(tmp_path / "a" / "model.pt")
    rates = torch.tensor([[res["metrics"][f"val_rate_{i:02d}"] for i in range(8)]])
    assert res["exec_gflops"] == float(executed_flops(model, rates, 32)[0]) / 1e9


class InterruptedValidation(ClassificationMethod):
    """Ctrl-C (KeyboardInterrupt) in the validation of epoch ``at``, once."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.fired, self.epoch = at, False, 1  # the epoch whose validation comes next

    def loss(self, model, batch, out, internals):
        if not model.training and not self.fired and self.epoch == self.at:
            self.fired = True
            raise KeyboardInterrupt
        return super().loss(model, batch, out, internals)

    def evaluate(self, model, epoch):
        self.epoch = epoch + 1
        return {}


@pytest.mark.parametrize("at", [1, 2])
def test_ctrl_c_during_validation_then_resume_keeps_every_epoch_row(tmp_path, at):
    """W2: Ctrl-C during end-of-epoch validation, then --resume: the interrupted epoch's row is
    written (same training averages as an uninterrupted run), and a finished run says 2 of 2 epochs."""
    ds, val = ToyFaces(), ToyFaces(n=9, seed=1)
    ref = train(_model(), ClassificationMethod(), ds, _cfg(tmp_path / "ref"), val_ds=val)
    method = InterruptedValidation(at)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), method, ds, _cfg(tmp_path / "b"), val_ds=val)
    res = train(_model(), method, ds, _cfg(tmp_path / "b", resume=True), val_ds=val)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r, w in zip(rows, want):
        for k in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert r[k] == pytest.approx(w[k], abs=1e-6), (k, r, w)
    assert res["val_top1"] == pytest.approx(ref["val_top1"])
    assert load_model(tmp_path / "b" / "model.pt").meta["epochs_done"] == 2


def test_epoch_lines_are_never_wrapped(tmp_path):
    """A narrow, non-terminal stderr (a CI log, COLUMNS=40) keeps each epoch line whole."""
    import os
    import subprocess
    import sys

    code = ("from facetool.engine import _Logger\n"
            "log = _Logger(True, 10, ['epoch', 'train_*', 'val_*'])\n"
            "log.epoch({'epoch': 1, 'train_loss': 1.23456, 'train_top1': 0.5, 'val_attr_acc': 0.75, "
            "'val_attr_base': 0.5, 'val_top1': 0.25})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "40"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("val_top1 0.25"), r.stderr


class EpochEnds(ClassificationMethod):
    """Records on_epoch_end calls and counts the training items it saw (resume_state: the count)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[int] = []
        self.seen = 0
        self.rows_at_end: list[int] = []

    def loss(self, model, batch, out, internals):
        if model.training:
            self.seen += int(batch["image"].shape[0])
        return super().loss(model, batch, out, internals)

    def on_epoch_end(self, ctx):
        assert ctx.model.training and ctx.rank == 0 and ctx.world == 1 and ctx.seed == 7
        self.ended.append(ctx.epoch)
        self.rows_at_end.append(self.seen)
        self.seen = 0

    def resume_state(self):
        return {"seen": torch.tensor(self.seen)}

    def load_resume_state(self, states, rank, world):
        assert (rank, world) == (0, 1) and len(states) == 1
        self.seen = int(states[0]["seen"])


def test_on_epoch_end_runs_once_per_epoch_and_resume_state_survives_an_interruption(tmp_path):
    """on_epoch_end: after each epoch's last step (before validation), once, also across a resume; the
    method's resume_state written at step 4 (inside epoch 2) is handed back, so the epoch's count is whole."""
    ds = ToyFaces()
    m = EpochEnds()
    train(_model(), m, ds, _cfg(tmp_path / "a", seed=7))
    assert m.ended == [0, 1] and m.rows_at_end == [24, 24]
    part = EpochEnds()
    train(_model(), part, ds, _cfg(tmp_path / "b", seed=7, max_steps=4))
    assert part.ended == [0] and part.seen == 8
    resumed = EpochEnds()  # fresh: the count comes from last.pt
    train(_model(), resumed, ds, _cfg(tmp_path / "b", seed=7, resume=True))
    assert resumed.ended == [1] and resumed.rows_at_end == [24]


class InterruptedEpochEnd(EpochEnds):
    def __init__(self) -> None:
        super().__init__()
        self.fired = False

    def on_epoch_end(self, ctx):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        super().on_epoch_end(ctx)


def test_ctrl_c_in_on_epoch_end_runs_it_again_on_resume(tmp_path):
    ds = ToyFaces()
    m = InterruptedEpochEnd()
    with pytest.raises(KeyboardInterrupt):
        train(_model(), m, ds, _cfg(tmp_path / "b", seed=7))
    fresh = EpochEnds()
    train(_model(), fresh, ds, _cfg(tmp_path / "b", seed=7, resume=True))
    assert fresh.ended == [0, 1] and fresh.rows_at_end == [24, 24]
