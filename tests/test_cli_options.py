"""One set of training options (issue 16): every command that trains takes every training option, the
mechanics have one default and one help text everywhere, `--val-every` works, and the architecture
names each training command offers come from the model registry (one alias table)."""

from __future__ import annotations

import json
import re

import pytest
import typer.main

from conftest import run_facetool
from facetool.cli import app
from facetool.errors import FacetoolError

#: every command that trains (a command with --epochs must be one of these)
TRAINING_COMMANDS = [("train", "resnet"), ("train", "aig"), ("train", "iig"), ("train", "abn"), ("train", "arcface"),
                     ("train", "condface"),
                     ("train", "fan"),
                     ("train", "fanface"),
                     ("distill",)]
#: the training options (flags as typed); only the first five may differ in default between commands
PER_METHOD = ["--epochs", "--batch-size", "--lr", "--schedule", "--milestones"]
MECHANICS = ["--lr-gamma", "--momentum", "--weight-decay", "--warmup-epochs", "--grad-clip", "--amp", "--flip",
             "--workers", "--seed", "--val-every", "--val-fraction", "--log-every", "--max-steps", "--resume",
             "--overwrite"]


def _commands() -> dict[tuple[str, ...], object]:
    """``{path: click command}`` of every leaf command of the CLI."""
    found = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + (name,))
        else:
            found[path] = cmd

    walk(typer.main.get_command(app), ())
    return found


def _options(cmd) -> dict[str, object]:
    """``{first long flag: click option}`` of a command."""
    return {next(o for o in p.opts if o.startswith("--")): p for p in cmd.params if p.opts and p.opts[0].startswith("-")}


def test_every_training_command_has_every_training_option_with_one_default_and_help():
    cmds = _commands()
    trainers = sorted(p for p, c in cmds.items() if "--epochs" in _options(c))
    assert trainers == sorted(TRAINING_COMMANDS), "a command with --epochs must take every training option"
    opts = {p: _options(cmds[p]) for p in TRAINING_COMMANDS}
    for p, o in opts.items():
        missing = [f for f in PER_METHOD + MECHANICS if f not in o]
        assert not missing, f"facetool {' '.join(p)} lacks {missing}"
    first = TRAINING_COMMANDS[0]
    for flag in MECHANICS:
        ref = opts[first][flag]
        for p in TRAINING_COMMANDS[1:]:
            o = opts[p][flag]
            assert (o.default, o.help, o.secondary_opts) == (ref.default, ref.help, ref.secondary_opts), \
                f"{flag}: facetool {' '.join(p)} has default {o.default!r} / help {o.help!r}, " \
                f"facetool {' '.join(first)} {ref.default!r} / {ref.help!r}"
    for flag in PER_METHOD:  # defaults may differ by method, the meaning (help) may not
        assert len({opts[p][flag].help for p in TRAINING_COMMANDS}) == 1, flag
    assert opts[("train", "resnet")]["--grad-clip"].default == 0.0  # the quickstart's value (train resnet / aig)
    assert opts[("train", "arcface")]["--schedule"].default == "poly" and opts[("distill",)]["--epochs"].default == 30


def test_the_option_list_is_the_library_one():
    from facetool.cli.options import MECHANICS as LIB_MECHANICS
    from facetool.cli.options import OPTIONS, PER_METHOD as LIB_PER_METHOD

    assert [s.flags[0].split("/")[0] for s in OPTIONS] == PER_METHOD + MECHANICS
    assert set(LIB_PER_METHOD) == {s.name for s in OPTIONS if s.flags[0] in PER_METHOD}
    assert set(LIB_MECHANICS) == {s.name for s in OPTIONS if s.flags[0].split("/")[0] in MECHANICS}


def test_only_per_method_options_take_a_per_command_default():
    from facetool.cli.options import OPTIONS, TrainOptions, training_options

    with pytest.raises(TypeError, match="grad_clip"):
        training_options(grad_clip=5.0)

    with pytest.raises(TypeError, match="seed"):
        @training_options()
        def cmd(seed: int = 0, train: TrainOptions = None) -> None:
            pass

    @training_options(epochs=3)
    def ok(x: int = 1, train: TrainOptions = None):
        return x, train

    x, t = ok(x=2, **{s.name: s.default for s in OPTIONS})  # what Typer passes: every option by name
    assert x == 2 and t == TrainOptions()


def test_train_config_from_options(tmp_path):
    from facetool.cli.options import TrainOptions
    from facetool.engine import TrainConfig

    opts = TrainOptions(epochs=4, schedule="step", milestones="1, 2.5", lr_gamma=0.5, grad_clip=0.0, max_steps=0,
                        val_every=2, log_every=7, flip=False)
    cfg = TrainConfig.from_options(opts, out=tmp_path / "o", extra={"store": "s.h5"})
    assert cfg.milestones == (1.0, 2.5) and cfg.gamma == 0.5 and cfg.grad_clip is None and cfg.max_steps is None
    assert cfg.val_every == 2 and cfg.log_every == 7 and not cfg.flip and cfg.extra == {"store": "s.h5"}
    cfg = TrainConfig.from_options(TrainOptions(grad_clip=5.0, max_steps=3), out=tmp_path)
    assert cfg.grad_clip == 5.0 and cfg.max_steps == 3 and cfg.milestones == ()
    for bad, flag in ((dict(val_every=0), "--val-every"), (dict(milestones="3,x"), "--milestones"),
                      (dict(milestones="-1"), "--milestones"), (dict(lr_gamma=0.0), "--lr-gamma"),
                      (dict(log_every=-1), "--log-every"), (dict(grad_clip=-1.0), "--grad-clip")):
        with pytest.raises(FacetoolError, match=flag):
            TrainConfig.from_options(TrainOptions(**bad), out=tmp_path)


def test_architecture_names_come_from_the_registry():
    """One alias table (the registry); each training command's help names exactly its family's models."""
    from facetool.models.registry import list_models, model_aliases, resolve_model_name
    from facetool.trainers.arcface import resolve_network
    from facetool.trainers.distill import resolve_student

    assert resolve_network("r50") == "iresnet50" == resolve_student("R50", None)
    assert resolve_network("mbf") == "mobilefacenet" == resolve_student("mbf", None)
    assert resolve_model_name("r50", family="abn", prefix="abn_") == "abn_iresnet50"
    assert resolve_model_name("aig_resnet18", family="aig", prefix="aig_") == "aig_resnet18"
    with pytest.raises(FacetoolError, match=r"unknown --network 'resnet50'; use one of iresnet18, .*mobilefacenet "
                                            r"\(aliases: r18 = iresnet18"):
        resolve_network("resnet50")  # a classifier is no recognition backbone
    with pytest.raises(FacetoolError, match="unknown --arch 'r50'; use one of resnet18, resnet34, resnet50, resnet101$"):
        resolve_model_name("r50", family="aig", prefix="aig_")
    cmds = _commands()

    def words(path, flag):
        return set(re.findall(r"[a-z0-9_]+", _options(cmds[path])[flag].help))

    for path in [("train", "resnet"), ("train", "aig"), ("train", "iig")]:
        assert {n.removeprefix("aig_") for n in list_models(family="aig")} <= words(path, "--arch")
        assert set(list_models(family="resnet")) <= words(path, "--arch")
    assert {n.removeprefix("abn_") for n in list_models(family="abn")} <= words(("train", "abn"), "--arch")
    assert set(model_aliases("recognition")) <= words(("train", "arcface"), "--network")
    assert set(list_models(family=("resnet", "recognition"))) | set(model_aliases()) <= words(("distill",), "--student")


def test_val_every_zero_is_refused_on_every_training_command(synthetic_store, tmp_path):
    """The error that names --val-every now has an option behind it, in two different commands."""
    for i, argv in enumerate([["train", "resnet", "--arch", "resnet18", "--width", "8"],
                              ["distill", "none", "--student", "resnet18", "--width", "8"]]):
        out = tmp_path / f"run{i}"
        r = run_facetool(*argv, "--store", synthetic_store, "--out", out, "--epochs", "1", "--val-every", "0",
                         cwd=tmp_path, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "--val-every must be in [1, 100000], got 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()


def test_train_resnet_validates_every_second_epoch(synthetic_store, tmp_path):
    out = tmp_path / "r"
    r = run_facetool("train", "resnet", "--store", synthetic_store, "--out", out, "--arch", "resnet18", "--width", "8",
                     "--input-size", "32", "--batch-size", "40", "--epochs", "3", "--val-every", "2", cwd=tmp_path,
                     timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert ["val_top1" in r for r in rows] == [False, True, True]  # epoch 2, and always the last one
    assert json.loads((out / "config.json").read_text())["train"]["val_every"] == 2


def test_recipes_keep_their_training_mechanics():
    """The one default of --grad-clip is the quickstart's (0, off); the recognition recipes keep
    arcface_torch's clip at 5 (0.2.x's `train arcface` default) by passing it, and every training step
    of every recipe still parses against the real CLI."""
    from pathlib import Path

    from facetool.recipe import load_recipe

    root = typer.main.get_command(app)
    arcface_steps = 0
    for recipe in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml")):
        for step in load_recipe(recipe)[1]:
            path = tuple(step.argv[:2]) if step.argv[0] == "train" else tuple(step.argv[:1])
            if path not in TRAINING_COMMANDS:
                continue
            group, args, parent, name = root, list(step.argv), None, "facetool"
            while hasattr(group, "commands"):  # descend to the leaf command, then parse its options
                ctx = group.context_class(group, info_name=name, parent=parent)
                name, group, args = group.resolve_command(ctx, args)
                parent = ctx
            params = group.make_context(name, args, parent=parent).params
            if path == ("train", "arcface"):
                arcface_steps += 1
                assert params["grad_clip"] == 5.0, (recipe.name, step.name)
            if recipe.name == "quickstart.toml":
                assert params["grad_clip"] == 0.0 and params["workers"] == 0, step.name
    assert arcface_steps == 8  # thesis_recognition (4), thesis_distillation (1), condface_synthetic (1), thesis_condface (2)
