"""`facetool dissect counterfactual` (issue 21): synthetic faces re-rendered with one concept off and on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import BIAS, run_facetool


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from facetool.data.synthetic import prepare_synthetic

    path = tmp_path_factory.mktemp("cf") / "planted.h5"
    prepare_synthetic(path, identities=6, per_identity=5, size=48, seed=3, test_fraction=0.2, bias=BIAS.format(p=0.9))
    return path


def test_rerender_reproduces_the_store_and_only_toggles_the_concept(planted):
    """Each stored face is re-rendered bit-exactly from the recorded generator settings (off = the stored image
    where it has no glasses, on = where it has), and the pair differs only around the glasses."""
    from facetool.explainers.counterfactual import CONCEPTS, Renderer, _source_index, generator_spec
    from facetool.store import FaceStore

    with FaceStore(planted) as st:
        r = Renderer(generator_spec(st))
        acc, _ = st.attribute("accessory")
        images, sources = st.images(np.arange(len(st))), st.sources
    assert 0 < acc.sum() < len(acc)
    for k in range(len(images)):
        off, on, mask = r.pair(*_source_index(sources[k]), CONCEPTS["accessory"])
        assert np.array_equal(on if acc[k] == 1 else off, images[k]), k
        assert mask.any() and not np.array_equal(off, on)


def test_model_input_is_the_store_loader_path(planted):
    """Rendered arrays go through the same normalisation and resize as the store's images."""
    from facetool.data.transforms import model_input
    from facetool.explainers.relevance import load_images
    from facetool.store import FaceStore

    with FaceStore(planted) as st:
        imgs = st.images(np.arange(4))
    for size in (48, 32):
        assert torch.equal(model_input(imgs, size), load_images(planted, np.arange(4), size))


def test_bootstrap_and_summary_hand_values():
    """Mean change, mean |change| and the bootstrap interval on hand-checked values: a constant sample has a
    zero-width interval at its value; [0.1, -0.3] has mean -0.1 and mean |change| 0.2, and the interval lies
    inside [-0.3, 0.1]."""
    from facetool.explainers.counterfactual import bootstrap_ci, changes, summarise

    assert bootstrap_ci(np.full(5, 0.25), 200, 0) == (0.25, 0.25)
    s = summarise(np.array([0.1, -0.3]), 500, 0)
    assert s["effect"] == pytest.approx(-0.1) and s["abs_effect"] == pytest.approx(0.2)
    assert -0.3 <= s["ci_low"] < s["ci_high"] <= 0.1
    assert np.isnan(summarise(np.array([0.1]), 0, 0)["ci_low"])
    assert changes(np.array([[0.2, 0.7], [0.5, 0.4]]), "class") == pytest.approx([0.5, -0.1])
    assert changes(np.array([[1.0, 0.9]]), "embedding") == pytest.approx([0.1])


def test_scores_hand_built_model():
    """The probability read off and on: a 2-class model whose logits are (0, mean pixel value) gives
    sigmoid(mean) for class 1, so a brighter 'on' image raises it by the hand-computed amount."""
    from facetool.explainers.counterfactual import Scorer, model_scores

    class Mean(torch.nn.Module):
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([torch.zeros_like(m), m], 1)

    off, on = torch.zeros(3, 3, 4, 4), torch.full((3, 3, 4, 4), 1.0)
    s = model_scores(Mean(), off, on, Scorer("class", slice(0, 2), np.array([1, 1, 0])), 2, "cpu")
    e = 1 / (1 + np.exp(-1.0))
    assert s == pytest.approx(np.array([[0.5, e], [0.5, e], [0.5, 1 - e]]))


def test_store_without_generator_is_refused(planted, tmp_path):
    """A store not written by the synthetic generator: one line, exit 2."""
    import shutil

    import h5py

    other = tmp_path / "other.h5"
    shutil.copy(planted, other)
    with h5py.File(other, "a") as f:
        pre = json.loads(f.attrs["preprocessing"])
        pre["generator"] = None
        f.attrs["preprocessing"] = json.dumps(pre)
    model = tmp_path / "m.pt"
    from facetool.models import create_model
    from facetool.models.checkpoint import save_checkpoint

    save_checkpoint(model, create_model("resnet18", num_classes=6, width=4, input_size=48))
    r = run_facetool("dissect", "counterfactual", "--model", model, "--store", other, "--out", tmp_path / "cf")
    assert r.returncode == 2, r.stderr
    assert "generator-backed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cf").exists()


def test_command_on_a_trained_checkpoint(planted, tmp_path):
    """`train resnet` writes a gender classifier; `dissect counterfactual --compare` scores it against itself
    per gender: table, JSON, CSVs and the pairs grid; the two copies get the same effect."""
    r = run_facetool("train", "resnet", "--store", planted, "--task", "attribute:gender", "--arch", "resnet18",
                     "--width", "4", "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    m = tmp_path / "m" / "model.pt"
    out = tmp_path / "cf"
    r = run_facetool("dissect", "counterfactual", "--compare", m, m, "--store", planted, "--pairs", "12",
                     "--subgroups", "gender", "--bootstrap", "100", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "counterfactual accessory" in r.stdout and "female" in r.stdout
    res = json.loads((out / "counterfactual.json").read_text())
    assert res["pairs"] == 12 and len(res["models"]) == 2 and res["score"] == "probability of the true gender"
    a, b = res["models"].values()
    assert a["effect"] == b["effect"] and set(a["subgroups"]) == {"female", "male"}
    assert a["ci_low"] <= a["effect"] <= a["ci_high"]
    for f in ("effects.csv", "pairs.csv", "pairs.png"):
        assert (out / f).stat().st_size > 0
    r = run_facetool("dissect", "counterfactual", "--model", m, "--store", planted, "--output", "attribute",
                     "--attribute", "gender=robot")
    assert r.returncode == 2 and "gender takes female, male" in r.stderr


@pytest.mark.slow
def test_planted_bias_shows_a_large_counterfactual_effect(gender_bias_models):
    """Putting glasses on 64 held-out faces (the fixture's "dict" store, glasses independent of gender) moves the
    biased gender classifier's P(male) up by far more than the clean one's. Measured (change of P(male) per
    seed, biased / clean; means): FACETOOL_TEST_SEED=0: 0.713, 0.731 / 0.017, 0.045 (0.722 vs 0.031); =100:
    0.691, 0.753 / 0.022, 0.032 (0.722 vs 0.027); =200: 0.749, 0.717 / 0.073, -0.017 (0.733 vs 0.028).
    Asserted: biased mean > 0.4, clean |mean| < 0.15, difference > 0.4."""
    from facetool.explainers.counterfactual import counterfactual

    store = gender_bias_models["stores"]["dict"]
    eff = {"biased": [], "clean": []}
    for (name, _seed), path in gender_bias_models["models"].items():
        res = counterfactual([path], store, None, pairs=64, output="attribute", attribute="gender=male",
                             bootstrap=200)
        eff[name].append(round(next(iter(res["models"].values()))["effect"], 4))
    b, c = np.mean(eff["biased"]), np.mean(eff["clean"])
    print(f"counterfactual change of P(male) per seed {eff}; means {b:.3f} vs {c:.3f}")
    assert b > 0.4 and abs(c) < 0.15 and b - c > 0.4, eff
