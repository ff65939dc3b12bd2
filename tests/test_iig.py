"""ConvNet-IIG: mask construction and validation, L_IIG and Eq. 5 against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from facetool.errors import FacetoolError
from facetool.trainers.iig import (IIGMethod, alternating_masks, contiguous_masks, estimate_attribute, iig_loss,
                                  load_masks, make_masks, masks_from_meta, validate_masks)


def test_constructors():
    assert alternating_masks(["female", "male"], [3, 4, 5, 6, 7, 8]) == {"female": [3, 5, 7], "male": [4, 6, 8]}
    assert contiguous_masks(["female", "male"], [3, 4, 5, 6, 7, 8]) == {"female": [3, 4, 5], "male": [6, 7, 8]}
    # ResNet-50 (16 gated blocks): the free blocks start at 3, so the default is the thesis example
    assert make_masks({"gender": ["female", "male"]}, 16) == {"gender": {"female": [3, 5, 7], "male": [4, 6, 8]}}
    m = make_masks({"gender": ["f", "m"], "age": ["a", "b", "c", "d"]}, 33, "contiguous")
    assert m["gender"] == {"f": [7, 8, 9], "m": [10, 11, 12]}
    assert m["age"]["a"] == [13, 14, 15] and m["age"]["d"] == [22, 23, 24]
    validate_masks(m, 33)
    with pytest.raises(FacetoolError, match="only 12 free gated blocks"):
        make_masks({"age": ["a", "b", "c", "d"]}, 16, per_value=4)
    with pytest.raises(FacetoolError, match="mask style"):
        make_masks({"gender": ["f", "m"]}, 16, "random")


def test_validation_errors_name_the_problem():
    with pytest.raises(FacetoolError, match="block 5 is in both gender=female and gender=male"):
        validate_masks({"gender": {"female": [3, 5], "male": [5, 6]}}, 16)
    with pytest.raises(FacetoolError, match="block 4 is in both gender=male and age=old"):
        validate_masks({"gender": {"female": [3], "male": [4]}, "age": {"young": [6], "old": [4]}}, 16)
    with pytest.raises(FacetoolError, match=r"block\(s\) 16, 20 \(out of range 0..15\)"):
        validate_masks({"gender": {"female": [3, 16, 20], "male": [4]}}, 16)
    with pytest.raises(FacetoolError, match=r"block\(s\) 1 \(not gated\)"):
        validate_masks({"gender": {"female": [1], "male": [4]}}, 16, gated=[3, 4, 5])
    with pytest.raises(FacetoolError, match="unknown value"):
        validate_masks({"gender": {"woman": [3], "male": [4]}}, 16, vocab={"gender": ["female", "male"]})
    with pytest.raises(FacetoolError, match="non-empty list"):
        validate_masks({"gender": {"female": [], "male": [4]}}, 16)


def test_mask_file(tmp_path):
    p = tmp_path / "masks.json"
    p.write_text(json.dumps({"gender": {"female": [3, 5, 7], "male": [4, 6, 8]}}))
    assert load_masks(p)["gender"]["male"] == [4, 6, 8]
    p.write_text("{not json")
    with pytest.raises(FacetoolError, match="not valid JSON"):
        load_masks(p)
    with pytest.raises(FacetoolError, match="not found"):
        load_masks(tmp_path / "nope.json")


MASKS = {"gender": {"f": [1, 3], "m": [2, 4]}}
GATES = torch.tensor([
    [1.0, 1.0, 0.0, 1.0, 0.0, 1.0],  # female, perfect: 0
    [0.0, 0.5, 0.5, 0.0, 1.0, 0.0],  # male: blocks 1..4 -> .25 + .25 + 0 + 0 = 0.5
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # unknown: 0
])


def test_iig_loss_hand_computed():
    codes = torch.tensor([0, 1, -1])
    assert iig_loss(GATES, codes, MASKS).item() == pytest.approx(0.5)
    # a second feature adds its own term: age {y: [0], o: [5]}; row0 old (o): (0-1)^2 + (1-1)^2 = 1;
    # row1 young: (1-0)^2 + (0-0)^2 = 1; row2 young: (1-1)^2 + (0-1)^2 = 1
    two = {**MASKS, "age": {"y": [0], "o": [5]}}
    codes2 = torch.tensor([[0, 1], [1, 0], [-1, 0]])
    assert iig_loss(GATES, codes2, two).item() == pytest.approx(0.5 + 3.0)
    assert iig_loss(GATES, {"gender": codes, "age": codes2[:, 1]}, two).item() == pytest.approx(3.5)
    # vocabulary order decides what a code means; a value without a mask contributes nothing
    assert iig_loss(GATES, torch.tensor([1, 0, 2]), MASKS, vocab={"gender": ["m", "f", "x"]}).item() == pytest.approx(0.5)
    g = GATES.clone().requires_grad_(True)
    iig_loss(g, codes, MASKS).backward()
    assert g.grad[1].tolist() == pytest.approx([0, 1.0, -1.0, 0, 0, 0])  # d/dg (t-g)^2 = 2(g-t)


def test_estimate_attribute_eq5():
    # row1: distance to f = .25+.25+1+1 = 2.5, to m = 0.5 -> m; row0 -> f; row2: f: 1+0+1+0=2, m: 0+1+0+1=2 tie -> f
    assert estimate_attribute(GATES, MASKS)["gender"].tolist() == [0, 1, 0]
    assert estimate_attribute(GATES, MASKS["gender"]).tolist() == [0, 1, 0]
    assert estimate_attribute(GATES, [[1, 3], [2, 4]]).tolist() == [0, 1, 0]
    est = estimate_attribute(GATES, MASKS, vocab={"gender": ["m", "x", "f"]})["gender"]
    assert est.tolist() == [2, 0, 0]  # the tie goes to the first value of the vocabulary


def test_method_loss_metrics_meta():
    vocab = {"gender": ["f", "m"]}
    m = IIGMethod(MASKS, vocab, 6, targets=[1.0] * 6)
    logits = torch.zeros(3, 4)
    batch = {"label": torch.tensor([0, 1, 2]), "attrs": torch.tensor([[0], [1], [-1]])}
    terms = m.loss(None, batch, logits, {"gates": GATES})
    assert terms["iig"].item() == pytest.approx(0.5 / 3)
    assert set(terms) == {"ce", "iig", "target"}
    met = m.metrics(batch, logits, {"gates": GATES})
    assert met["acc_gender"] == 1.0
    masks, vocab2 = masks_from_meta(m.meta())
    assert masks == MASKS and vocab2 == vocab
    with pytest.raises(FacetoolError, match="not trained with ConvNet-IIG"):
        masks_from_meta({"method": "aig"})
    with pytest.raises(FacetoolError, match="overlap"):
        IIGMethod({"gender": {"f": [1], "m": [1]}}, vocab, 6)


def test_make_masks_per_feature_counts_paper_layout():
    """ConvNet-IIG on ResNet-101: 3+3 blocks for gender, 4x4 for age, disjoint, inside the free blocks."""
    from facetool.trainers.iig import make_masks, validate_masks

    feats = {"gender": ["female", "male"], "age": ["0-20", "20-40", "40-60", "60+"]}
    m = make_masks(feats, 33, "contiguous", (3, 4))
    assert m["gender"] == {"female": [7, 8, 9], "male": [10, 11, 12]}
    assert m["age"]["0-20"] == [13, 14, 15, 16] and m["age"]["60+"] == [25, 26, 27, 28]
    validate_masks(m, 33)
    with pytest.raises(FacetoolError, match="one per feature"):
        make_masks(feats, 33, "contiguous", (3, 4, 5))
    with pytest.raises(FacetoolError, match="only 23 free"):
        make_masks(feats, 33, "contiguous", (4, 4))
