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
    ("nan", lambda ck: ck["state_dict"]["fc.weight"].fill_(float("nan")), "non-finite weights (NaN or inf) in fc.weight"),
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
