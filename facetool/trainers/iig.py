"""ConvNet-IIG: interpretable inference graphs. Attribute values own disjoint sets of gated blocks.

Masks are ``{feature: {value: [block, ...]}}`` with 0-based indices into the model's L gated blocks
(``gated_blocks(model)`` order), e.g. ``{"gender": {"female": [3, 5, 7], "male": [4, 6, 8]}}``.
All sets must be disjoint, within a feature and across features. A value of the store's vocabulary
without a mask is allowed: its images contribute nothing to the IIG loss.

Loss (per feature f, per image i with known code c_i, over the blocks j in the union U_f of f's
masks -- blocks outside U_f are not constrained by f)::

    L_IIG = sum_f sum_i sum_{j in U_f} (1[j in M_{f, c_i}] - g_ij)^2

:func:`iig_loss` returns that sum; :class:`IIGMethod` divides it by the batch size so the learning
rate does not depend on it. Rows with an unknown code (-1) contribute 0.

Attribute estimation (Eq. 5): ``c_hat = argmin_c sum_{j in U_f} (1[j in M_{f,c}] - g_j)^2``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from facetool.trainers.classify import ClassificationMethod
from facetool.errors import FacetoolError
from facetool.trainers.aig import execution_rates, scaled_pins, target_loss

Masks = dict[str, dict[str, list[int]]]
MASK_STYLES = ("alternating", "contiguous")


def alternating_masks(values: Sequence[str], blocks: Sequence[int]) -> dict[str, list[int]]:
    """Deal ``blocks`` to the values in turn: block k goes to value k mod V."""
    return {v: [int(b) for b in blocks[i :: len(values)]] for i, v in enumerate(values)}


def contiguous_masks(values: Sequence[str], blocks: Sequence[int]) -> dict[str, list[int]]:
    """Split ``blocks`` into V consecutive groups of equal size (e.g. 3+3 for gender)."""
    k = len(blocks) // len(values)
    return {v: [int(b) for b in blocks[i * k : (i + 1) * k]] for i, v in enumerate(values)}


def make_masks(features: Mapping[str, Sequence[str]], num_blocks: int, style: str = "alternating",
               per_value: int | Sequence[int] = 3, candidates: Sequence[int] | None = None) -> Masks:
    """Masks for several features, feature k taking the next ``V_k * per_value[k]`` candidate blocks.

    ``per_value`` is one number for every feature or one per feature (the paper's gender + age
    masks on ResNet-101 are 3 per gender value and 4 per age bracket: ``per_value=(3, 4)``).
    ``candidates`` defaults to the blocks the AIG target schedule leaves free (not pinned, see
    :func:`facetool.trainers.aig.scaled_pins`): e.g. blocks 3..14 of a 16-block ResNet-50."""
    if style not in MASK_STYLES:
        raise FacetoolError(f"unknown mask style {style!r}; use one of {', '.join(MASK_STYLES)}")
    per = [int(per_value)] if isinstance(per_value, int) else [int(k) for k in per_value]
    if len(per) == 1:
        per = per * len(features)  # one number serves every feature
    if len(per) != len(features):
        raise FacetoolError(f"{len(per)} blocks-per-value numbers for {len(features)} feature(s) "
                            f"({', '.join(features)}); give one, or one per feature")
    if min(per, default=1) < 1:
        raise FacetoolError(f"--blocks-per-value must be >= 1, got {min(per)}")
    if candidates is None:
        first, last = scaled_pins(num_blocks)
        candidates = list(range(first, num_blocks - last))
    need = sum(len(v) * k for v, k in zip(features.values(), per))
    if need > len(candidates):
        what = ", ".join(f"{f} {k}/value" for f, k in zip(features, per))
        raise FacetoolError(f"{need} blocks needed ({what}), but only {len(candidates)} free gated blocks; "
                            "use fewer per value, fewer features or a deeper model")
    masks: Masks = {}
    pos = 0
    for (feat, values), k in zip(features.items(), per):
        take = list(candidates[pos : pos + len(values) * k])
        pos += len(take)
        masks[feat] = (alternating_masks if style == "alternating" else contiguous_masks)(list(values), take)
    return masks


def validate_masks(masks: Mapping, num_blocks: int, vocab: Mapping[str, Sequence[str]] | None = None,
                   gated: Sequence[int] | None = None) -> Masks:
    """Check types, range, gatedness and disjointness (within and across features); return a clean copy."""
    if not isinstance(masks, Mapping) or not masks:
        raise FacetoolError("masks must be a non-empty {feature: {value: [blocks]}} mapping")
    allowed = set(range(num_blocks)) if gated is None else set(gated)
    owner: dict[int, str] = {}
    clean: Masks = {}
    for feat, per in masks.items():
        if not isinstance(per, Mapping) or not per:
            raise FacetoolError(f"masks of feature {feat!r} must be a non-empty {{value: [blocks]}} mapping")
        if vocab is not None:
            if feat not in vocab:
                raise FacetoolError(f"masks name feature {feat!r}, which is not being trained")
            unknown = [v for v in per if v not in vocab[feat]]
            if unknown:
                raise FacetoolError(f"masks of {feat!r} name unknown value(s) {', '.join(map(repr, unknown))}; "
                                    f"the store has {', '.join(vocab[feat])}")
        clean[feat] = {}
        for value, blocks in per.items():
            if not isinstance(blocks, (list, tuple)) or not blocks or not all(
                    isinstance(b, int) and not isinstance(b, bool) for b in blocks):
                raise FacetoolError(f"mask {feat}={value} must be a non-empty list of block indices")
            bad = sorted({b for b in blocks if b not in allowed})
            if bad:
                what = f"out of range 0..{num_blocks - 1}" if gated is None else "not gated"
                raise FacetoolError(f"mask {feat}={value} uses block(s) {', '.join(map(str, bad))} ({what})")
            for b in blocks:
                here = f"{feat}={value}"
                if b in owner:
                    raise FacetoolError(f"masks overlap: block {b} is in both {owner[b]} and {here}")
                owner[b] = here
            clean[feat][str(value)] = [int(b) for b in blocks]
    return clean


def load_masks(path: str | Path) -> Masks:
    """Read a JSON mask file ``{"gender": {"female": [3, 5, 7], "male": [4, 6, 8]}}``."""
    p = Path(path)
    if not p.is_file():
        raise FacetoolError(f"mask file not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FacetoolError(f"mask file {p} is not valid JSON: {e}") from None


def _indicators(per: Mapping[str, Sequence[int]], values: Sequence[str], L: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(V, L) indicator of each vocabulary value's mask, (L,) union, (V,) has-a-mask."""
    M = torch.zeros(len(values), L, device=device)
    for vi, v in enumerate(values):
        for b in per.get(v, []):
            M[vi, b] = 1.0
    return M, (M.sum(0) > 0).float(), M.sum(1) > 0


def _codes_of(codes: Tensor | Mapping[str, Tensor], feats: list[str]) -> dict[str, Tensor]:
    if isinstance(codes, Mapping):
        return {f: codes[f] for f in feats}
    if codes.dim() == 1:
        if len(feats) != 1:
            raise ValueError(f"codes (B,) given for {len(feats)} features; pass (B, F) or a dict")
        return {feats[0]: codes}
    return {f: codes[:, i] for i, f in enumerate(feats)}


def iig_loss(gates: Tensor, codes: Tensor | Mapping[str, Tensor], masks: Masks,
             vocab: Mapping[str, Sequence[str]] | None = None) -> Tensor:
    """Sum over features, images and the feature's mask blocks of ``(1[j in M_c] - g_ij)^2``.

    ``codes``: (B,) for one feature, (B, F) in the order of ``masks``, or {feature: (B,)};
    code k means ``vocab[feature][k]`` (default: the order of the feature's mask keys); -1 unknown."""
    feats = list(masks)
    per_feat = _codes_of(codes, feats)
    g = gates.float()
    total = g.new_zeros(())
    for f in feats:
        values = list(vocab[f]) if vocab is not None else list(masks[f])
        M, union, has = _indicators(masks[f], values, g.shape[1], g.device)
        c = per_feat[f].long().to(g.device)
        ok = (c >= 0) & (c < len(values))
        ok &= has[c.clamp(0, len(values) - 1)]
        target = M[c.clamp(0, len(values) - 1)]  # (B, L)
        sq = (target - g) ** 2 * union
        total = total + (sq.sum(1) * ok.float()).sum()
    return total


def estimate_attribute(gates: Tensor, masks: Masks | Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
                       vocab: Mapping[str, Sequence[str]] | None = None) -> dict[str, Tensor] | Tensor:
    """Eq. 5: per feature, the code whose mask is nearest (squared L2 over the feature's mask blocks)
    to the gates. ``masks`` of several features ({feature: {value: blocks}}) -> {feature: (B,) codes}
    (codes index ``vocab[feature]``, default the order of the mask keys); masks of one feature,
    {value: blocks} or a list of block lists (one per value) -> (B,) codes in that order."""
    if isinstance(masks, (list, tuple)):
        masks = {str(i): list(m) for i, m in enumerate(masks)}
    if masks and all(isinstance(v, (list, tuple)) for v in masks.values()):
        return estimate_attribute(gates, {"_": dict(masks)})["_"]
    g = gates.float()
    out = {}
    for f, per in masks.items():
        values = list(vocab[f]) if vocab is not None else list(per)
        M, union, has = _indicators(per, values, g.shape[1], g.device)
        d = (((M[None] - g[:, None]) ** 2) * union).sum(-1)  # (B, V)
        d[:, ~has] = float("inf")
        out[f] = d.argmin(1)
    return out


class IIGMethod(ClassificationMethod):
    """Cross-entropy + L_IIG / B (+ L_target with ``targets``). Batches need ``attrs`` (B, F) in the
    order of ``features`` (``FaceDataset(attributes=features)``)."""

    name = "iig"

    def __init__(self, masks: Masks, vocab: Mapping[str, Sequence[str]], num_blocks: int,
                 targets: Sequence[float] | None = None, weight: float = 1.0, target_weight: float = 1.0) -> None:
        self.features = list(masks)
        self.vocab = {f: list(vocab[f]) for f in self.features}
        self.masks = validate_masks(masks, num_blocks, self.vocab)
        self.targets = [float(t) for t in targets] if targets is not None else None
        self.weight, self.target_weight = float(weight), float(target_weight)
        for opt, v in (("--iig-weight", self.weight), ("--target-weight", self.target_weight)):
            if not (v >= 0 and math.isfinite(v)):
                raise FacetoolError(f"{opt} must be >= 0, got {v}")

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        g = internals["gates"]
        terms["iig"] = self.weight * iig_loss(g, batch["attrs"], self.masks, self.vocab) / g.shape[0]
        if self.targets is not None:
            terms["target"] = self.target_weight * target_loss(g, self.targets)
        return terms

    def metrics(self, batch, out, internals):
        m = {**super().metrics(batch, out, internals), **execution_rates(internals["gates"], self.targets)}
        est = estimate_attribute(internals["gates"], self.masks, self.vocab)
        codes = _codes_of(batch["attrs"], self.features)
        for f in self.features:
            known = codes[f] >= 0
            if known.any():
                m[f"acc_{f}"] = float((est[f][known] == codes[f][known]).float().mean())
        return m

    def meta(self) -> dict:
        """Checkpoint meta: ``masks`` {feature: {value: blocks}}, ``vocab`` {feature: values} (the
        store's order; codes index it), ``features``, ``iig`` (loss settings)."""
        return {"masks": self.masks, "vocab": self.vocab, "features": self.features,
                "iig": {"targets": self.targets, "weight": self.weight, "target_weight": self.target_weight}}

    def log_keys(self) -> tuple[str, ...]:
        return (*super().log_keys(), "val_exec_rate")


def masks_from_meta(meta: Mapping) -> tuple[Masks, dict[str, list[str]]]:
    """(masks, vocab) stored by :class:`IIGMethod` in a checkpoint's meta (``load_model(...).meta``)."""
    if not isinstance(meta, Mapping) or not meta.get("masks"):
        raise FacetoolError("this checkpoint was not trained with ConvNet-IIG (no attribute masks in its meta)")
    return meta["masks"], meta["vocab"]
