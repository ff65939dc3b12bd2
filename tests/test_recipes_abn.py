"""The ABN recipes: --dry-run prints every step, and every step's options parse against the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from conftest import run_facetool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["abn_celeba.toml", "abn_synthetic.toml"])
def test_recipe_steps_parse(name):
    from facetool.cli import app
    from facetool.recipe import load_recipe

    title, steps = load_recipe(ROOT / "recipes" / name)
    cmd = typer.main.get_command(app)
    for step in steps:
        group, args, parent, name_ = cmd, list(step.argv), None, "facetool"
        while hasattr(group, "commands"):  # descend to the leaf command, then parse its options
            ctx = group.context_class(group, info_name=name_, parent=parent)
            name_, group, args = group.resolve_command(ctx, args)
            parent = ctx
        sub = group.make_context(name_, args, parent=parent)
        assert not sub.args, (step.name, sub.args)
    if name == "abn_celeba.toml":
        train = next(s.argv for s in steps if s.argv[:2] == ["train", "abn"])
        for opt, val in (("--arch", "resnet101"), ("--task", "attributes"), ("--epochs", "10"), ("--lr", "0.01")):
            assert train[train.index(opt) + 1] == val


def test_abn_celeba_dry_run():
    r = run_facetool("recipe", ROOT / "recipes" / "abn_celeba.toml", "--dry-run", "--set", "root=/data/CelebA")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "prepare celeba --root /data/CelebA" in out and "train abn" in out and "--arch resnet101" in out
    assert "--task attributes --epochs 10 --lr 0.01" in out and "dissect attention" in out
