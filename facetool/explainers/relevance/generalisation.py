"""`facetool dissect generalisation`: mask each image's most relevant fraction by model A, measure
model B's accuracy drop."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.explainers.relevance.inputs import load_images
from facetool.explainers.relevance.maps import METHODS, cam_notes, explain
from facetool.explainers.relevance.metrics import FILLS, mask_by_map
from facetool.explainers.relevance.targets import Target, attribute_slice, forward, resolve
from facetool.tasks import task_of


def _own_target(model: nn.Module) -> Target:
    """What a model of the matrix is scored on: its identity class, or its (single) attribute."""
    task = task_of(model)
    if getattr(model, "output_kind", "classification") != "classification":
        raise FacetoolError(f"{getattr(model, 'name', 'model')}: the generalisation matrix needs classifiers "
                            "(accuracy drop); this is an embedding model")
    if task.kind == "attribute":
        return Target("attribute", task.names[0])
    if task.kind == "attributes":
        raise FacetoolError("the generalisation matrix scores single-task models (identity or attribute:NAME)")
    return Target("label")


def _own_labels(model: nn.Module, tgt: Target, labels: np.ndarray, attrs: dict) -> tuple[Tensor, slice | None]:
    if tgt.kind == "attribute":
        return torch.as_tensor(attrs[tgt.attribute]), attribute_slice(model, tgt.attribute)
    return torch.as_tensor(labels), None


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, sl: slice | None, batch: int = 64) -> float:
    from facetool.explainers.lrp import eval_mode

    with eval_mode(model), torch.no_grad():
        out = torch.cat([forward(model, x[i:i + batch]) for i in range(0, len(x), batch)])
    o = out if sl is None else out[:, sl]
    ok = y >= 0
    return float((o.argmax(1)[ok] == y[ok]).float().mean()) if ok.any() else float("nan")


def generalisation_matrix(model_paths: Sequence[str | Path], store_path: str | Path, out: str | Path, *,
                          method: str = "lrp", split: str = "test", limit: int = 64, fraction: float = 0.2,
                          patch: int = 8, fill: str = "mean", batch_size: int = 16, seed: int = 0,
                          overwrite: bool = False, arch: str | None = None, device: str | None = "cpu") -> dict:
    """Mask each image by model A's relevance (its own target), measure model B's accuracy drop on
    B's own task. Rows A (plus a ``random`` row), columns B; PNG heatmap + CSV + JSON. ``arch``: the
    architecture of model files that record none; ``device``: where the models run (cpu by default, as
    before)."""
    import pandas as pd

    from facetool.devices import resolve_device
    from facetool.errors import require_file
    from facetool.explainers.dissect import _plt, _savefig
    from facetool.io import guard_output, write_json, write_text
    from facetool.models.checkpoint import load_model
    from facetool.data.sources import face_source
    from facetool.store import FaceStore

    paths = [Path(p) for p in model_paths]
    dev = resolve_device(device)
    if not 0.0 < fraction < 1.0:
        raise FacetoolError(f"--fraction must be in (0, 1), got {fraction}")
    if method not in METHODS or method == "attention":
        raise FacetoolError(f"--method must be one of {', '.join(m for m in METHODS if m != 'attention')}")
    if fill not in FILLS:
        raise FacetoolError(f"unknown --fill {fill!r}; use one of {', '.join(FILLS)}")
    for opt, v in (("--limit", limit), ("--batch-size", batch_size), ("--patch", patch)):
        if not v >= 1:
            raise FacetoolError(f"{opt} must be >= 1, got {v}")
    out = guard_output(out, inputs=(*paths, store_path), overwrite=overwrite, is_dir=True)
    if len(paths) < 2:
        raise FacetoolError("--models needs at least two checkpoints (comma-separated)")
    for p in paths:
        require_file(p, "--models")
    require_file(store_path, "--store")
    models = [load_model(p, name=arch) for p in paths]
    targets = [_own_target(m) for m in models]
    names = []
    for p in paths:
        n = p.parent.name if p.stem == "model" else p.stem
        names.append(n if n not in names else f"{n}_{len(names)}")
    for m in models:
        m.to(dev)
    notes = [n for m, name in zip(models, names)
             for n in cam_notes(m, method, int(getattr(m, "input_size", 112)), name)]
    with FaceStore(face_source(store_path)) as st:
        rows = st.indices(split)[:limit]
        if len(rows) == 0:
            raise FacetoolError(f"the {split} split of {Path(store_path).name} is empty")
        labels = st.labels[rows]
        attrs = {t.attribute: st.attribute(t.attribute)[0][rows] for t in targets if t.kind == "attribute"}
    sizes = [int(getattr(m, "input_size", 112)) for m in models]
    xs = {s: load_images(Path(store_path), rows, s) for s in set(sizes)}
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
           "notes": notes,
           "files": [str(out / "matrix.csv"), str(out / "matrix.png"), str(out / "matrix.json")]}
    write_json(out / "matrix.json", res)
    return res
