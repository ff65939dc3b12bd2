"""Relevance maps for face models and their validation: one protocol for every explainer.

Explainers (``--method``): LRP (``lrp`` EpsilonPlusFlat, ``lrp-gamma`` EpsilonGammaBox, ``lrp-ab``
EpsilonAlpha2Beta1; :mod:`facetool.methods.lrp`), the Grad-CAM family through ``pytorch-grad-cam``
(``gradcam``, ``gradcam++``, ``scorecam``; the layer is the model's ``cam_layer``), ``attention`` (the
model's own ``internals["attention"]``, e.g. ABN) and ``random`` (a baseline: i.i.d. uniform maps).

What is explained (``--target``): ``label`` (the true identity class), ``predicted`` (the argmax),
``attribute:NAME`` (an attribute model's logit of the image's true value, else its prediction), or
``cosine`` for embedding models: the cosine similarity of the image's embedding to a reference
embedding (``--reference self | same-identity | IMAGE | pairs.txt``). LRP starts from the relevance
``e_k * r_k / (|e| |r|)`` per embedding dimension (its sum is the cosine); Grad-CAM differentiates the
cosine. (With ``self`` the cosine is at its maximum, so its gradient - and every gradient-based CAM -
is zero; LRP still decomposes it.)

Validation:

* :func:`perturbation_curves`: remove pixels or ``patch`` x ``patch`` regions in relevance order
  (MoRF), in reverse (LeRF) and in a random order, in ``steps`` equal steps up to ``max_fraction`` of
  the image, filling with ``mean`` (per-image channel mean), ``blur`` (Gaussian blur) or ``black``;
  score = probability of the explained class, or the cosine; ``AOPC = 1/(K+1) sum_k (s_0 - s_k)``
  (Samek et al. 2017). A good explainer has a high MoRF AOPC and a low LeRF AOPC.
* :func:`part_mass`: share of the positive relevance inside each ground-truth part mask vs the part's
  share of the image area (ratio > 1: the explainer concentrates on the part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError

LRP_METHODS = ("lrp", "lrp-gamma", "lrp-ab")
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}
METHODS = LRP_METHODS + tuple(CAM_METHODS) + ("random", "attention")
FILLS = ("mean", "blur", "black")
ORDERS = ("morf", "lerf", "random")


# ------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """What a map explains. ``kind``: label | predicted | attribute | cosine."""

    kind: str
    attribute: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        t = text.strip()
        if t in ("label", "predicted", "cosine"):
            return cls(t)
        if t.startswith("attribute:") and t.split(":", 1)[1]:
            return cls("attribute", t.split(":", 1)[1])
        raise FacetoolError(f"unknown --target {text!r}; use label, predicted, attribute:NAME or cosine")

    def __str__(self) -> str:
        return f"attribute:{self.attribute}" if self.kind == "attribute" else self.kind


def model_task(model: nn.Module) -> dict:
    """The checkpoint's task description (CONTRACTS.md); identity models without one are identity."""
    cfg = getattr(model, "config", {}) or {}
    task = cfg.get("task") or (getattr(model, "meta", {}) or {}).get("task")
    return task if isinstance(task, dict) else {"kind": "identity"}


def attribute_slice(model: nn.Module, name: str) -> slice:
    """The logits of attribute ``name`` in the model's output (facetool.tasks.task_slice)."""
    from facetool.tasks import task_slice

    task = model_task(model)
    if task.get("kind") not in ("attribute", "attributes"):
        raise FacetoolError(f"--target attribute:{name} needs an attribute model (train with --task attribute:{name}); "
                            f"this model's task is {task.get('kind', 'identity')}")
    return task_slice(task, name)


def check_target(model: nn.Module, target: Target) -> None:
    """Refuse targets the model cannot explain (one-line errors)."""
    is_classifier = getattr(model, "task", "classification") == "classification"
    kind = model_task(model).get("kind", "identity")
    if target.kind in ("label", "predicted") and not is_classifier:
        raise FacetoolError(f"--target {target.kind} needs a model with a class head; {getattr(model, 'name', 'this model')} "
                            "is an embedding model (use --target cosine with --reference)")
    if target.kind == "label" and kind != "identity":
        raise FacetoolError(f"--target label explains identity classes, but this model predicts {kind}; "
                            "use --target attribute:NAME")
    if target.kind == "predicted" and kind == "attributes":
        raise FacetoolError("--target predicted is ambiguous for a multi-attribute model; use --target attribute:NAME")
    if target.kind == "cosine" and is_classifier:
        raise FacetoolError("--target cosine needs an embedding model; this model has a class head "
                            "(use --target label or predicted)")
    if target.kind == "attribute":
        attribute_slice(model, target.attribute)


class _ClassTarget:
    """pytorch-grad-cam target: the logit of class ``c`` within ``sl`` of the output."""

    def __init__(self, c: int, sl: slice | None = None) -> None:
        self.c, self.sl = int(c), sl

    def __call__(self, out: Tensor) -> Tensor:
        o = out if self.sl is None else out[..., self.sl]
        return o[..., self.c]


class CosineTarget:
    """pytorch-grad-cam target for embedding models: cosine similarity to a reference embedding."""

    def __init__(self, reference: Tensor) -> None:
        self.reference = reference.detach()

    def __call__(self, out: Tensor) -> Tensor:
        return F.cosine_similarity(out, self.reference.to(out), dim=-1)


@dataclass
class Explained:
    """Per-image description of the explained quantity: ``classes`` (B,) within ``sl`` or ``refs`` (B, D)."""

    classes: Tensor | None = None
    refs: Tensor | None = None
    sl: slice | None = None
    #: for multi-attribute models: the explained attribute's head (its attention map)
    head: int | None = None

    def select(self, idx) -> "Explained":
        return Explained(None if self.classes is None else self.classes[idx],
                         None if self.refs is None else self.refs[idx], self.sl, self.head)

    def lrp_output(self, out: Tensor) -> Tensor:
        """Relevance at the model output (its sum is the explained logit, or the cosine)."""
        if self.refs is not None:
            r = F.normalize(self.refs.to(out), dim=1)
            return out * r / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rel = torch.zeros_like(out)
        o = out if self.sl is None else out[:, self.sl]
        sub = torch.zeros_like(o)
        sub.scatter_(1, self.classes.view(-1, 1).to(out.device), o.gather(1, self.classes.view(-1, 1).to(out.device)))
        if self.sl is None:
            return sub
        rel[:, self.sl] = sub
        return rel

    def score(self, out: Tensor) -> Tensor:
        """Perturbation score: probability of the explained class, or the cosine."""
        if self.refs is not None:
            return F.cosine_similarity(out, self.refs.to(out), dim=1)
        o = out if self.sl is None else out[:, self.sl]
        return o.softmax(1).gather(1, self.classes.view(-1, 1).to(out.device))[:, 0]

    def cam_targets(self) -> list:
        if self.refs is not None:
            return [CosineTarget(r) for r in self.refs]
        return [_ClassTarget(int(c), self.sl) for c in self.classes]


def resolve(model: nn.Module, x: Tensor, target: Target, labels: Tensor | None = None,
            attr_codes: Tensor | None = None, refs: Tensor | None = None) -> Explained:
    """The explained quantity for a batch (the model's predictions where needed)."""
    check_target(model, target)
    if target.kind == "cosine":
        if refs is None:
            raise FacetoolError("--target cosine needs a reference (--reference self|same-identity|IMAGE|pairs.txt)")
        return Explained(refs=refs)
    sl = attribute_slice(model, target.attribute) if target.kind == "attribute" else None
    with torch.no_grad():
        out = model(x)
    o = out if sl is None else out[:, sl]
    pred = o.argmax(1)
    if target.kind == "predicted":
        return Explained(classes=pred, sl=sl)
    if target.kind == "label":
        if labels is None:
            raise FacetoolError("--target label needs identity labels")
        if int(labels.max()) >= o.shape[1]:
            raise FacetoolError(f"the store has labels up to {int(labels.max())}, the model only {o.shape[1]} classes: "
                                "--target label needs the model trained on this store's identities (use predicted)")
        return Explained(classes=labels.long(), sl=sl)
    codes = attr_codes.long() if attr_codes is not None else torch.full_like(pred, -1)
    task = model_task(model)
    head = list(task.get("names", [])).index(target.attribute) if task.get("kind") == "attributes" else None
    return Explained(classes=torch.where(codes >= 0, codes, pred), sl=sl, head=head)


def embed(model: nn.Module, x: Tensor, batch: int = 64) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.new_zeros(0)


# ------------------------------------------------------------------------------------------- explainers


def _cam_layer(model: nn.Module) -> nn.Module:
    name = getattr(model, "cam_layer", "")
    if not name or not hasattr(model, "get_layer"):
        raise FacetoolError(f"{type(model).__name__} names no cam_layer; Grad-CAM needs a facetool model")
    return model.get_layer(name)


def explain(model: nn.Module, x: Tensor, method: str, what: Explained, *, seed: int = 0,
            bias_free: bool = False) -> np.ndarray:
    """Maps (B, H, W) float32 for a batch: signed relevance summed over colour channels (LRP), CAM
    maps in [0, 1] (Grad-CAM family), attention in [0, 1], or uniform noise (random)."""
    from facetool.methods.lrp import eval_mode, lrp

    if method not in METHODS:
        raise FacetoolError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    B, _, H, W = x.shape
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand(B, H, W, generator=g).numpy().astype(np.float32)
    if method in LRP_METHODS:
        rel, _ = lrp(model, x, what.lrp_output, method, bias_free=bias_free)
        return rel.sum(1).numpy().astype(np.float32)
    if method == "attention":
        if "attention" not in getattr(model, "internal_names", ()):
            raise FacetoolError(f"--method attention needs a model with an attention map (ABN); "
                                f"{getattr(model, 'name', type(model).__name__)} has none")
        with eval_mode(model), torch.no_grad():
            _, internals = model(x, return_internals=True)
        att = internals["attention"].float()
        if att.shape[1] > 1:  # one map per attribute head: the explained attribute's, else their mean
            att = att[:, what.head:what.head + 1] if what.head is not None else att.mean(1, keepdim=True)
        from facetool.methods.attention import upsample_maps  # cells on their receptive-field centres

        up = upsample_maps(att, (H, W), stride=getattr(model, "attention_stride", None))
        return up[:, 0].numpy().astype(np.float32)
    import pytorch_grad_cam

    layer = _cam_layer(model)
    cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
    with eval_mode(model):
        with cls(model=model, target_layers=[layer]) as cam:
            if method == "scorecam":
                cam.batch_size = 32
            maps = cam(input_tensor=x, targets=what.cam_targets())
    return np.nan_to_num(np.asarray(maps, np.float32))


# ------------------------------------------------------------------------------------------- validation


def _fill(x: Tensor, fill: str) -> Tensor:
    from facetool.data.transforms import MEAN, STD

    if fill == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if fill == "black":
        return torch.full_like(x, (0.0 - MEAN) / STD)
    if fill == "blur":
        from torchvision.transforms.functional import gaussian_blur

        k = max(3, int(round(x.shape[-1] / 8)) | 1)
        return gaussian_blur(x, [k, k], [k / 3.0, k / 3.0])
    raise FacetoolError(f"unknown --fill {fill!r}; use one of {', '.join(FILLS)}")


def region_scores(maps: Tensor, patch: int) -> Tensor:
    """(B, h*w) region relevance: the map summed over ``patch`` x ``patch`` cells (patch 1 = pixels)."""
    if patch <= 1:
        return maps.flatten(1)
    return F.avg_pool2d(maps[:, None], patch, patch, ceil_mode=True)[:, 0].flatten(1)


def removal_masks(order: Tensor, counts: Sequence[int], grid: tuple[int, int], patch: int,
                  size: tuple[int, int]) -> Tensor:
    """(K, B, 1, H, W) masks (1 = removed) of the first ``counts[k]`` regions in ``order`` (B, R)."""
    B, R = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(R).expand(B, R))
    out = []
    for n in counts:
        m = (rank < n).float().view(B, 1, *grid)
        if patch > 1:
            m = m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., : size[0], : size[1]]
        out.append(m)
    return torch.stack(out)


def perturbation_curves(model: nn.Module, x: Tensor, maps: np.ndarray | Tensor, what: Explained, *,
                        steps: int = 10, max_fraction: float = 0.5, patch: int = 8, fill: str = "mean",
                        seed: int = 0, batch: int = 64) -> dict:
    """Scores (B, steps + 1) after removing 0 .. ``max_fraction`` of the image in MoRF, LeRF and a
    random order; returns ``{"fractions", "morf", "lerf", "random", "aopc_*"}``."""
    from facetool.methods.lrp import eval_mode

    if steps < 1 or not 0.0 < max_fraction <= 1.0:
        raise FacetoolError("--steps must be >= 1 and --max-fraction in (0, 1]")
    if patch < 1 or patch > min(x.shape[-2:]):
        raise FacetoolError(f"--patch must be between 1 and the image size {min(x.shape[-2:])}, got {patch}")
    maps_t = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    B, _, H, W = x.shape
    scores_r = region_scores(maps_t, patch)
    grid = (math.ceil(H / patch), math.ceil(W / patch)) if patch > 1 else (H, W)
    R = scores_r.shape[1]
    counts = [int(round(R * max_fraction * k / steps)) for k in range(steps + 1)]
    g = torch.Generator().manual_seed(int(seed) + 1)
    orders = {
        "morf": torch.sort(scores_r, dim=1, descending=True, stable=True).indices,
        "lerf": torch.sort(scores_r, dim=1, descending=False, stable=True).indices,
        "random": torch.stack([torch.randperm(R, generator=g) for _ in range(B)]),
    }
    filled = _fill(x, fill)
    res: dict = {"fractions": [c / R for c in counts]}
    with eval_mode(model), torch.no_grad():
        for name, order in orders.items():
            masks = removal_masks(order, counts, grid, patch, (H, W))  # (K, B, 1, H, W)
            xs = (x[None] * (1 - masks) + filled[None] * masks).flatten(0, 1)
            whats = [what] * (steps + 1)
            out = torch.cat([model(xs[i:i + batch]) for i in range(0, len(xs), batch)])
            sc = torch.cat([w.score(out[k * B:(k + 1) * B]) for k, w in enumerate(whats)]).view(steps + 1, B).T
            res[name] = sc.numpy()
            res[f"aopc_{name}"] = float((sc[:, :1] - sc).mean().item())
    return res


def part_mass(maps: np.ndarray, masks: dict[str, np.ndarray]) -> list[dict]:
    """Per part: mean share of the positive relevance inside the part, mean area share, their ratio
    (over the images where the part is visible)."""
    pos = np.clip(np.asarray(maps, np.float64), 0, None)
    total = pos.sum((1, 2))
    rows = []
    for part, m in masks.items():
        m = np.asarray(m, bool)
        area = m.mean((1, 2))
        ok = (area > 0) & (total > 0)
        if not ok.any():
            continue
        share = (pos * m).sum((1, 2))[ok] / total[ok]
        rows.append({"part": part, "images": int(ok.sum()), "relevance_share": float(share.mean()),
                     "area_share": float(area[ok].mean()), "ratio": float(share.mean() / area[ok].mean())})
    return rows


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (B, H, W) boolean masks to ``size``."""
    if masks.shape[-1] == size:
        return masks
    t = torch.as_tensor(masks[:, None].astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy() > 0.5


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its largest absolute value (for display and averaging)."""
    m = np.asarray(maps, np.float32)
    s = np.abs(m).reshape(len(m), -1).max(1).clip(1e-12)
    return m / s[:, None, None]


Scorer = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------- the command


def _load_images(store_path: Path, rows: np.ndarray, size: int) -> Tensor:
    from facetool.data.dataset import FaceDataset

    ds = FaceDataset(store_path, None, size=size, indices=rows)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]) if len(ds) else torch.zeros(0, 3, size, size)


def _image_file(path: Path, size: int) -> Tensor:
    from facetool.data.transforms import MEAN, STD
    from facetool.detect.retinaface import read_rgb

    img = read_rgb(path)
    if img is None:
        raise FacetoolError(f"--reference {path}: not a readable image file")
    t = (torch.from_numpy(img).permute(2, 0, 1).float() - MEAN) / STD
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _read_pairs(path: Path, n: int) -> np.ndarray:
    pairs = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            a, b = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise FacetoolError(f"{path}:{ln}: expected two store indices 'i j', got {line.strip()!r}") from None
        if not (0 <= a < n and 0 <= b < n):
            raise FacetoolError(f"{path}:{ln}: index out of range (the store has {n} images)")
        pairs.append((a, b))
    if not pairs:
        raise FacetoolError(f"{path} holds no pairs (lines 'i j' of store indices)")
    return np.asarray(pairs, np.int64)


def select_rows(store, split: str, limit: int, reference: str | None, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows to explain and, for ``same-identity`` / pairs references, the reference row of each."""
    if reference and reference.endswith(".txt") and Path(reference).is_file():
        pairs = _read_pairs(Path(reference), len(store))[:limit]
        return pairs[:, 0], pairs[:, 1]
    rows = store.indices(split)
    if len(rows) == 0:
        raise FacetoolError(f"the {split} split of {store.path.name} is empty")
    if reference == "same-identity":
        ref = []
        keep = []
        for r in rows:
            same = rows[(labels[rows] == labels[r]) & (rows != r)]
            if len(same):
                keep.append(r)
                ref.append(same[(same > r).argmax()] if (same > r).any() else same[0])
        if not keep:
            raise FacetoolError(f"--reference same-identity: no identity has two images in the {split} split")
        return np.asarray(keep[:limit]), np.asarray(ref[:limit])
    return rows[:limit], None


def _plots(out: Path, images: Tensor, maps: np.ndarray, signed: bool, grid: int, title: str) -> Path:
    from facetool.methods.dissect import _plt, _savefig

    plt = _plt()
    n = min(grid, len(maps))
    cols = min(8, n)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    nm = normalise(maps[:n])
    imgs = ((images[:n].permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(imgs[i].mean(-1), cmap="gray", vmin=0, vmax=1)
        ax.imshow(nm[i], cmap="bwr" if signed else "jet", vmin=-1 if signed else 0, vmax=1, alpha=0.55)
    fig.suptitle(title, fontsize=8)
    return _savefig(fig, out)


def _mean_maps_plot(out: Path, means: dict, signed: bool) -> Path | None:
    from facetool.methods.dissect import _plt, _savefig

    if not means:
        return None
    plt = _plt()
    rows = len(means)
    cols = max(len(v) for v in means.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows), squeeze=False)
    for r, (attr, vals) in enumerate(means.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(vals):
                (val, (m, cnt)) = list(vals.items())[c]
                v = np.abs(m).max() or 1.0
                ax.imshow(m / v, cmap="bwr" if signed else "jet", vmin=-1 if signed else 0, vmax=1)
                ax.set_title(f"{attr}={val} ({cnt})", fontsize=7)
    return _savefig(fig, out)


def _curves_plot(out: Path, res: dict, title: str) -> Path:
    from facetool.methods.dissect import _plt, _savefig

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for name in ORDERS:
        ax.plot(res["fractions"], np.asarray(res[name]).mean(0), marker="o", ms=3,
                label=f"{name} (AOPC {res[f'aopc_{name}']:.3f})")
    ax.set_xlabel("fraction of the image removed")
    ax.set_ylabel(res.get("score_name", "score"))
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return _savefig(fig, out)


def dissect_relevance(model_path: str | Path, store_path: str | Path, out: str | Path, *, method: str = "lrp",
                      target: str = "predicted", reference: str | None = None, split: str = "test",
                      limit: int = 64, batch_size: int = 16, steps: int = 10, max_fraction: float = 0.5,
                      patch: int = 8, fill: str = "mean", grid: int = 16, seed: int = 0,
                      attributes: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """``facetool dissect relevance``: maps, perturbation validation, part masses, plots, HDF5 + JSON/CSV."""
    import time

    import h5py
    import pandas as pd

    from facetool.errors import require_file
    from facetool.io import atomic_path, guard_output, write_json, write_text
    from facetool.models.checkpoint import load_model
    from facetool.store import UNKNOWN, FaceStore

    model_path, store_path, out = Path(model_path), Path(store_path), Path(out)
    require_file(model_path, "--model")
    require_file(store_path, "--store")
    guard_output(out, inputs=(model_path, store_path), overwrite=overwrite, is_dir=True)
    if method not in METHODS:
        raise FacetoolError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if fill not in FILLS:
        raise FacetoolError(f"unknown --fill {fill!r}; use one of {', '.join(FILLS)}")
    if limit < 1 or batch_size < 1:
        raise FacetoolError("--limit and --batch-size must be >= 1")
    tgt = Target.parse(target)
    model = load_model(model_path)
    if not isinstance(model, nn.Module) or not hasattr(model, "cam_layer"):
        raise FacetoolError(f"{model_path.name}: relevance needs a facetool torch model (not ONNX)")
    check_target(model, tgt)
    if tgt.kind == "cosine" and not reference:
        raise FacetoolError("--target cosine needs --reference self|same-identity|IMAGE|pairs.txt")
    if method in LRP_METHODS:
        from facetool.methods.lrp import check_canonizable

        check_canonizable(model)
    size = int(getattr(model, "input_size", 0) or model.config.get("input_size", 112))

    with FaceStore(store_path) as st:
        labels_all = st.labels
        rows, ref_rows = select_rows(st, split, limit, reference if tgt.kind == "cosine" else None, labels_all)
        attr_names = attributes if attributes is not None else sorted(
            set(st.attribute_names("image")) | set(st.attribute_names("identity")))
        attrs = {a: st.attribute(a) for a in attr_names}
        parts = st.parts
        part_masks = {p: st.part_masks(rows, p) for p in parts}
    attr_codes = None
    if tgt.kind == "attribute":
        if tgt.attribute not in attrs:
            raise FacetoolError(f"the store has no attribute {tgt.attribute!r}")
        attr_codes = torch.as_tensor(attrs[tgt.attribute][0][rows])
    x = _load_images(store_path, rows, size)
    labels = torch.as_tensor(labels_all[rows])
    refs = None
    if tgt.kind == "cosine":
        if reference == "self":
            refs = embed(model, x)
        elif ref_rows is not None:
            refs = embed(model, _load_images(store_path, ref_rows, size))
        else:
            rp = Path(reference)
            if not rp.is_file():
                raise FacetoolError(f"--reference {reference!r}: use self, same-identity, an image file or a pairs .txt")
            refs = embed(model, _image_file(rp, size)).expand(len(x), -1)

    maps, whats = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        what = resolve(model, xb, tgt, labels[i:i + batch_size],
                       None if attr_codes is None else attr_codes[i:i + batch_size],
                       None if refs is None else refs[i:i + batch_size])
        maps.append(explain(model, xb, method, what, seed=seed + i))
        whats.append(what)
    seconds = time.perf_counter() - t0
    maps_np = np.concatenate(maps)
    what_all = Explained(
        classes=None if whats[0].classes is None else torch.cat([w.classes for w in whats]),
        refs=refs, sl=whats[0].sl, head=whats[0].head)
    curves = perturbation_curves(model, x, maps_np, what_all, steps=steps, max_fraction=max_fraction,
                                 patch=patch, fill=fill, seed=seed)
    curves["score_name"] = "cosine" if tgt.kind == "cosine" else "probability of the explained class"
    parts_rows = part_mass(maps_np, {p: resize_masks(m, size) for p, m in part_masks.items()})
    signed = method in LRP_METHODS

    out.mkdir(parents=True, exist_ok=True)
    files = []
    # per-image maps
    with atomic_path(out / "maps.h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("maps", data=maps_np, compression="gzip")
            f.create_dataset("index", data=rows)
            f.create_dataset("label", data=labels.numpy())
            if what_all.classes is not None:
                f.create_dataset("explained_class", data=what_all.classes.numpy())
            if ref_rows is not None:
                f.create_dataset("reference_index", data=ref_rows)
            for k in ORDERS:
                f.create_dataset(f"curves/{k}", data=np.asarray(curves[k], np.float32))
            f.create_dataset("curves/fractions", data=np.asarray(curves["fractions"], np.float32))
            means: dict = {}
            nm = normalise(maps_np)
            for a, (codes, vals) in attrs.items():
                c = codes[rows]
                for v, name in enumerate(vals):
                    sel = c == v
                    if sel.any() and v != UNKNOWN:
                        mm = nm[sel].mean(0)
                        means.setdefault(a, {})[name] = (mm, int(sel.sum()))
                        f.create_dataset(f"mean/{a}/{name}", data=mm)
            f.attrs.update({"method": method, "target": str(tgt), "reference": reference or "",
                            "model": str(model_path), "store": str(store_path), "split": split,
                            "signed": signed, "input_size": size})
    files.append(out / "maps.h5")
    title = f"{model_path.name}: {method}, target {tgt}" + (f" vs {reference}" if tgt.kind == "cosine" else "")
    files.append(_plots(out / "overlay.png", x, maps_np, signed, grid, title))
    mp = _mean_maps_plot(out / "mean_maps.png", means, signed)
    if mp:
        files.append(mp)
    files.append(_curves_plot(out / "curves.png", curves, title))
    cdf = pd.DataFrame({"fraction": curves["fractions"], **{k: np.asarray(curves[k]).mean(0) for k in ORDERS}})
    write_text(out / "curves.csv", cdf.to_csv(index=False))
    files.append(out / "curves.csv")
    if parts_rows:
        write_text(out / "parts.csv", pd.DataFrame(parts_rows).to_csv(index=False))
        files.append(out / "parts.csv")
    metrics = {
        "model": str(model_path), "store": str(store_path), "method": method, "target": str(tgt),
        "reference": reference, "split": split, "images": int(len(rows)), "input_size": size,
        "maps_per_second": len(rows) / max(seconds, 1e-9), "fill": fill, "patch": patch, "steps": steps,
        "max_fraction": max_fraction, "score": curves["score_name"],
        "aopc_morf": curves["aopc_morf"], "aopc_lerf": curves["aopc_lerf"], "aopc_random": curves["aopc_random"],
        "parts": parts_rows, "files": [str(p) for p in files],
    }
    write_json(out / "metrics.json", metrics)
    metrics["files"].append(str(out / "metrics.json"))
    return metrics


# ------------------------------------------------------------------------------------------- generalisation


def _own_target(model: nn.Module) -> Target:
    """What a model of the matrix is scored on: its identity class, or its (single) attribute."""
    task = model_task(model)
    if getattr(model, "task", "classification") != "classification":
        raise FacetoolError(f"{getattr(model, 'name', 'model')}: the generalisation matrix needs classifiers "
                            "(accuracy drop); this is an embedding model")
    if task.get("kind") == "attribute":
        return Target("attribute", task["names"][0])
    if task.get("kind") == "attributes":
        raise FacetoolError("the generalisation matrix scores single-task models (identity or attribute:NAME)")
    return Target("label")


def _own_labels(model: nn.Module, tgt: Target, labels: np.ndarray, attrs: dict) -> tuple[Tensor, slice | None]:
    if tgt.kind == "attribute":
        return torch.as_tensor(attrs[tgt.attribute]), attribute_slice(model, tgt.attribute)
    return torch.as_tensor(labels), None


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, sl: slice | None, batch: int = 64) -> float:
    from facetool.methods.lrp import eval_mode

    with eval_mode(model), torch.no_grad():
        out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    o = out if sl is None else out[:, sl]
    ok = y >= 0
    return float((o.argmax(1)[ok] == y[ok]).float().mean()) if ok.any() else float("nan")


def mask_by_map(x: Tensor, maps: Tensor, fraction: float, patch: int, fill: str) -> Tensor:
    """``x`` with the ``fraction`` most relevant patches of ``maps`` (resized to x) replaced by ``fill``."""
    H, W = x.shape[-2:]
    m = maps[:, None].float()
    if m.shape[-2:] != (H, W):
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    scores = region_scores(m[:, 0], patch)
    grid = (math.ceil(H / patch), math.ceil(W / patch)) if patch > 1 else (H, W)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    k = int(round(scores.shape[1] * fraction))
    masks = removal_masks(order, [k], grid, patch, (H, W))[0]
    return x * (1 - masks) + _fill(x, fill) * masks


def generalisation_matrix(model_paths: Sequence[str | Path], store_path: str | Path, out: str | Path, *,
                          method: str = "lrp", split: str = "test", limit: int = 64, fraction: float = 0.2,
                          patch: int = 8, fill: str = "mean", batch_size: int = 16, seed: int = 0,
                          overwrite: bool = False) -> dict:
    """Mask each image by model A's relevance (its own target), measure model B's accuracy drop on
    B's own task. Rows A (plus a ``random`` row), columns B; PNG heatmap + CSV + JSON."""
    import pandas as pd

    from facetool.errors import require_file
    from facetool.io import guard_output, write_json, write_text
    from facetool.methods.dissect import _plt, _savefig
    from facetool.models.checkpoint import load_model
    from facetool.store import FaceStore

    paths = [Path(p) for p in model_paths]
    out = guard_output(out, inputs=(*paths, store_path), overwrite=overwrite, is_dir=True)
    if len(paths) < 2:
        raise FacetoolError("--models needs at least two checkpoints (comma-separated)")
    for p in paths:
        require_file(p, "--models")
    require_file(store_path, "--store")
    if not 0.0 < fraction < 1.0:
        raise FacetoolError(f"--fraction must be in (0, 1), got {fraction}")
    if method not in METHODS or method == "attention":
        raise FacetoolError(f"--method must be one of {', '.join(m for m in METHODS if m != 'attention')}")
    models = [load_model(p) for p in paths]
    targets = [_own_target(m) for m in models]
    names = []
    for p in paths:
        n = p.parent.name if p.stem == "model" else p.stem
        names.append(n if n not in names else f"{n}_{len(names)}")
    with FaceStore(store_path) as st:
        rows = st.indices(split)[:limit]
        if len(rows) == 0:
            raise FacetoolError(f"the {split} split of {Path(store_path).name} is empty")
        labels = st.labels[rows]
        attrs = {t.attribute: st.attribute(t.attribute)[0][rows] for t in targets if t.kind == "attribute"}
    sizes = [int(getattr(m, "input_size", 112)) for m in models]
    xs = {s: _load_images(Path(store_path), rows, s) for s in set(sizes)}
    ys = [_own_labels(m, t, labels, attrs) for m, t in zip(models, targets)]
    base = [_accuracy(m, xs[s], y, sl) for m, s, (y, sl) in zip(models, sizes, ys)]
    maps = {}
    for a, (m, t, s) in enumerate(zip(models, targets, sizes)):
        chunks = []
        for i in range(0, len(rows), batch_size):
            xb = xs[s][i:i + batch_size]
            y, _ = ys[a]
            what = resolve(m, xb, t, torch.as_tensor(labels[i:i + batch_size]),
                           y[i:i + batch_size] if t.kind == "attribute" else None)
            chunks.append(torch.as_tensor(explain(m, xb, method, what, seed=seed + i)))
        maps[names[a]] = torch.cat(chunks)
    g = torch.Generator().manual_seed(seed)
    maps["random"] = torch.rand(len(rows), 64, 64, generator=g)
    drop = np.zeros((len(maps), len(models)))
    for i, (an, amap) in enumerate(maps.items()):
        for j, (m, s, (y, sl)) in enumerate(zip(models, sizes, ys)):
            xm = mask_by_map(xs[s], amap, fraction, max(1, round(patch * s / max(sizes))), fill)
            drop[i, j] = base[j] - _accuracy(m, xm, y, sl)
    df = pd.DataFrame(drop, index=list(maps), columns=names)
    df.index.name = "masked_by"
    write_text(out / "matrix.csv", df.to_csv())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 0.6 * len(maps) + 1.8))
    im = ax.imshow(drop, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(names)), [f"{n}\n({t})" for n, t in zip(names, targets)], fontsize=7)
    ax.set_yticks(range(len(maps)), list(maps), fontsize=7)
    for i in range(drop.shape[0]):
        for j in range(drop.shape[1]):
            ax.text(j, i, f"{drop[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if drop[i, j] < drop.max() / 2 else "k")
    ax.set_xlabel("accuracy drop of model (column)")
    ax.set_ylabel(f"top {fraction:.0%} masked by relevance of")
    fig.colorbar(im, ax=ax)
    _savefig(fig, out / "matrix.png")
    res = {"models": names, "paths": [str(p) for p in paths], "targets": [str(t) for t in targets],
           "method": method, "fraction": fraction, "patch": patch, "fill": fill, "images": int(len(rows)),
           "base_accuracy": dict(zip(names, base)), "drop": {r: dict(zip(names, drop[i])) for i, r in enumerate(maps)},
           "files": [str(out / "matrix.csv"), str(out / "matrix.png"), str(out / "matrix.json")]}
    write_json(out / "matrix.json", res)
    return res
