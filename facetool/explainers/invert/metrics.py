"""How good an inversion is: SSIM to the input faces, cosine to the targets under the model and a
judge, and verification accuracy of (inverted, real) pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.explainers.invert.inputs import InversionInputs
from facetool.explainers.invert.optimise import InversionResult, embed


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (pytorch-msssim, 11-px Gaussian window) of normalised images in [-1, 1]."""
    from pytorch_msssim import ssim as _ssim

    return _ssim((a.float() + 1) / 2, (b.float() + 1) / 2, data_range=1.0, size_average=False)


def best_threshold_accuracy(scores: np.ndarray, same: np.ndarray) -> float:
    """Accuracy of the best single threshold on ``scores`` (higher = same) over all pairs."""
    scores, same = np.asarray(scores, float), np.asarray(same, bool)
    cands = np.concatenate([[-np.inf], np.sort(scores)])
    return float(max(((scores > c) == same).mean() for c in cands))


def inverted_pairs(labels: np.ndarray, ref_labels: np.ndarray, exclude: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each inverted image i: one genuine pair (a real image of the same identity, not row
    ``exclude[i]``) and one impostor pair (a real image of another identity). Returns
    (inverted index, real row, same) for the pairs that could be formed."""
    rng = np.random.default_rng(seed)
    inv, real, same = [], [], []
    rows = np.arange(len(ref_labels))
    for i, y in enumerate(labels):
        gen = rows[(ref_labels == y) & (rows != exclude[i])]
        imp = rows[ref_labels != y]
        if len(gen) and len(imp):
            inv += [i, i]
            real += [int(rng.choice(gen)), int(rng.choice(imp))]
            same += [True, False]
    return np.array(inv, int), np.array(real, int), np.array(same, bool)


def pair_accuracy(scores: np.ndarray, same: np.ndarray) -> tuple[float, str]:
    """Verification accuracy of pair scores: 10-fold (threshold chosen on 9 folds) when there are at
    least 20 pairs, else the best single threshold over all pairs (optimistic). Returns (acc, method)."""
    scores, same = np.asarray(scores, float), np.asarray(same, bool)
    if len(scores) < 20:
        return best_threshold_accuracy(scores, same), "best-threshold"
    from facetool.eval.verification import kfold_accuracy

    # cosine of unit embeddings -> squared L2 distance 2 - 2cos, the LFW protocol's scale (0..4)
    return kfold_accuracy(2.0 - 2.0 * scores, same)["accuracy"], "10-fold"


def embed_at(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """:func:`embed` of normalised images resized (bilinear, antialiased) to the model's own input size
    where it records one and they differ: a judge may be built for another size than the inverted model."""
    from facetool.models.features import input_size_of

    size = input_size_of(model)
    if size and tuple(images.shape[-2:]) != (size, size) and len(images):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return embed(model, images)


def real_pair_images(store, rows: np.ndarray, size: int) -> torch.Tensor:
    """Normalised real faces of store ``rows`` at ``size`` px (the inverted model's input size, as the
    inverted faces and the inputs are): the pair protocol compares like with like."""
    from facetool.data.transforms import normalize
    from facetool.explainers.invert.inputs import _resize
    from facetool.store import FaceStore

    with FaceStore(store) as st:
        imgs = st.images(rows)
    return normalize(_resize(imgs, size)) if len(imgs) else torch.zeros(0, 3, size, size)


def verification_pairs(inputs: InversionInputs, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (inverted index, real store row, same) pairs of ``--pairs`` (:func:`inverted_pairs`)."""
    if inputs.store is None or inputs.rows is None:
        raise FacetoolError("--pairs needs --images STORE.h5 (real images of the same identities)")
    from facetool.store import FaceStore

    with FaceStore(inputs.store) as st:
        ref_labels = st.labels
    inv_i, real_rows, same = inverted_pairs(inputs.labels, ref_labels, inputs.rows, seed)
    if len(inv_i) == 0:
        raise FacetoolError("--pairs: the store has no other image of these identities")
    return inv_i, real_rows, same


def check_evaluation(inputs: InversionInputs, model: nn.Module, judge: nn.Module | None, pairs: bool, size: int,
                     seed: int = 0) -> None:
    """Everything :func:`evaluate_inversion` will need, checked before the optimisation (which can take
    hours): the pairs can be formed, their real faces read at ``size`` px, and the judge (or the model)
    embeds faces of that size (resized to its own input size). One-line errors."""
    if judge is None and not pairs:
        return
    probe = torch.zeros(1, 3, size, size)
    if pairs:
        _, real_rows, _ = verification_pairs(inputs, seed)
        probe = real_pair_images(inputs.store, real_rows[:1], size)
    who = "--judge" if judge is not None else "--model"
    try:
        out = embed_at(judge if judge is not None else model, probe)
    except RuntimeError as e:
        from facetool.errors import clip_message

        raise FacetoolError(f"{who} cannot embed the {size}x{size} faces of this inversion: "
                            f"{clip_message(e, 200)}") from None
    if out.dim() != 2:
        raise FacetoolError(f"{who} outputs shape {tuple(out.shape)}, not one embedding per face")


def evaluate_inversion(
    result: InversionResult,
    inputs: InversionInputs,
    model: nn.Module,
    judge: nn.Module | None = None,
    pairs: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of an inversion: SSIM to the input faces, cosine to the target under ``model`` and
    (with input faces) under ``judge``; with ``pairs``, verification accuracy of (inverted, real)
    pairs under the judge (or the model). Every face is at the inverted model's input size, resized to
    the judge's own where that differs. Per-image values under ``per_image``."""
    from facetool.data.transforms import normalize

    inv = result.images
    m: dict[str, Any] = {"images": len(inv), "iterations": result.steps,
                         "cosine_model": float(result.final_cosine.mean())}
    per: dict[str, list] = {"cosine_model": result.final_cosine.tolist()}
    real = normalize(inputs.images) if inputs.images is not None else None
    if real is not None:
        s = ssim(inv, real)
        m["ssim"], per["ssim"] = float(s.mean()), s.tolist()
        if judge is not None:
            c = F.cosine_similarity(embed_at(judge, inv), embed_at(judge, real), dim=1)
            m["cosine_judge"], per["cosine_judge"] = float(c.mean()), c.tolist()
    if pairs:
        inv_i, real_rows, same = verification_pairs(inputs, seed)
        real_imgs = real_pair_images(inputs.store, real_rows, int(inv.shape[-1]))
        j = judge if judge is not None else model
        a = F.normalize(embed_at(j, inv[inv_i]), dim=1)
        b = F.normalize(embed_at(j, real_imgs), dim=1)
        acc, how = pair_accuracy((a * b).sum(1).numpy(), same)
        m |= {"pairs": int(len(same)), "pair_accuracy": acc, "pair_protocol": how}
    m["per_image"] = per
    return m
