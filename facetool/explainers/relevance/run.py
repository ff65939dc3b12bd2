"""`facetool dissect relevance`: maps, validation curves, part mass and figures for one model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from facetool import distributed as fd
from facetool.errors import FacetoolError
from facetool.explainers.relevance.inputs import image_file, load_images, select_rows
from facetool.explainers.relevance.maps import LRP_METHODS, METHODS, cam_notes, explain, normalise
from facetool.explainers.relevance.metrics import FILLS, ORDERS, part_mass, perturbation_curves, resize_masks
from facetool.explainers.relevance.plots import plot_curves, plot_mean_maps, plot_overlays
from facetool.explainers.relevance.targets import Explained, Target, check_target, embed, resolve


def check_options(*, method: str, target: str, reference: str | None = None, fill: str = "mean", limit: int = 64,
                  batch_size: int = 16, steps: int = 10, max_fraction: float = 0.5, patch: int = 8,
                  grid: int = 16) -> Target:
    """Every option of ``dissect relevance`` that needs no file, checked before any work (a bad
    ``--grid`` used to fail after every map was computed). Returns the parsed target."""
    if method not in METHODS:
        raise FacetoolError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if fill not in FILLS:
        raise FacetoolError(f"unknown --fill {fill!r}; use one of {', '.join(FILLS)}")
    for opt, v in (("--limit", limit), ("--batch-size", batch_size), ("--steps", steps), ("--patch", patch),
                   ("--grid", grid)):
        if not v >= 1:
            raise FacetoolError(f"{opt} must be >= 1, got {v}")
    if not 0.0 < max_fraction <= 1.0:
        raise FacetoolError(f"--max-fraction must be in (0, 1], got {max_fraction}")
    tgt = Target.parse(target)
    if tgt.kind == "cosine" and not reference:
        raise FacetoolError("--target cosine needs --reference self|same-identity|IMAGE|pairs.txt")
    if reference is not None and tgt.kind != "cosine":
        raise FacetoolError(f"--reference applies only to --target cosine (embedding models), not --target {tgt}; "
                            "drop --reference or use --target cosine")
    return tgt


def dissect_relevance(model_path: str | Path, store_path: str | Path, out: str | Path, *, method: str = "lrp",
                      target: str = "predicted", reference: str | None = None, split: str = "test",
                      limit: int = 64, batch_size: int = 16, steps: int = 10, max_fraction: float = 0.5,
                      patch: int = 8, fill: str = "mean", grid: int = 16, seed: int = 0,
                      attributes: Sequence[str] | None = None, overwrite: bool = False, arch: str | None = None,
                      device: str | None = "cpu") -> dict | None:
    """``facetool dissect relevance``: maps, perturbation validation, part masses, plots, HDF5 + JSON/CSV.
    ``arch``: architecture of a model file that records none; ``device``: where the model runs (cpu by
    default, as before; images, maps and results stay on the CPU). ``notes`` in the result: doubts about
    the maps (a CAM layer too coarse). Under ``torchrun`` (a process group of several) the map batches and
    the perturbation forwards are split over the ranks; rank 0 merges them in index order, writes every
    output once and gets the one-process result, the other ranks None."""
    import time

    import h5py
    import pandas as pd

    from facetool.data.sources import face_source
    from facetool.devices import resolve_device
    from facetool.errors import require_file
    from facetool.io import atomic_path, guard_output, write_json, write_text
    from facetool.models.checkpoint import load_model
    from facetool.store import UNKNOWN, FaceStore

    model_path, store_path, out = Path(model_path), Path(store_path), Path(out)
    dev = resolve_device(device)
    tgt = check_options(method=method, target=target, reference=reference, fill=fill, limit=limit,
                        batch_size=batch_size, steps=steps, max_fraction=max_fraction, patch=patch, grid=grid)
    require_file(model_path, "--model")
    require_file(store_path, "--store")
    guard_output(out, inputs=(model_path, store_path), overwrite=overwrite, is_dir=True)
    model = load_model(model_path, name=arch)
    if not isinstance(model, nn.Module) or not hasattr(model, "cam_layer"):
        raise FacetoolError(f"{model_path.name}: relevance needs a facetool torch model (not ONNX)")
    check_target(model, tgt)
    if method in LRP_METHODS:
        from facetool.explainers.lrp import check_canonizable

        check_canonizable(model)
    size = int(getattr(model, "input_size", 0) or model.config.get("input_size", 112))
    if patch > size:
        raise FacetoolError(f"--patch must be between 1 and the model's input size {size}, got {patch}")
    model.to(dev)
    notes = cam_notes(model, method, size, model_path.name)

    with FaceStore(face_source(store_path)) as st:
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
    x = load_images(store_path, rows, size)
    labels = torch.as_tensor(labels_all[rows])
    refs = None
    if tgt.kind == "cosine":
        if reference == "self":
            refs = embed(model, x)
        elif ref_rows is not None:
            refs = embed(model, load_images(store_path, ref_rows, size))
        else:
            rp = Path(reference)
            if not rp.is_file():
                raise FacetoolError(f"--reference {reference!r}: use self, same-identity, an image file or a pairs .txt")
            refs = embed(model, image_file(rp, size)).expand(len(x), -1)

    def batch_maps(idx: np.ndarray) -> tuple[np.ndarray, Explained]:
        """Maps of the batch of images ``idx`` (consecutive) and what they explain (without the refs)."""
        i, j = int(idx[0]), int(idx[-1]) + 1
        what = resolve(model, x[i:j], tgt, labels[i:j], None if attr_codes is None else attr_codes[i:j],
                       None if refs is None else refs[i:j])
        return explain(model, x[i:j], method, what, seed=seed + i), Explained(what.classes, None, what.sl, what.head)

    # under torchrun the batches (one process's) are split over the ranks; every rank gets every map back
    # and takes its share of the perturbation forwards, rank 0 alone scores and writes
    sharded = fd.sharded()
    t0 = time.perf_counter()
    done = fd.map_sharded(len(x), batch_maps, batch_size=batch_size, to_all=True)
    seconds = time.perf_counter() - t0
    maps_np = np.concatenate([m for m, _ in done])
    whats = [w for _, w in done]
    what_all = Explained(
        classes=None if whats[0].classes is None else torch.cat([w.classes for w in whats]),
        refs=refs, sl=whats[0].sl, head=whats[0].head)
    curves = perturbation_curves(model, x, maps_np, what_all, steps=steps, max_fraction=max_fraction,
                                 patch=patch, fill=fill, seed=seed, sharded=sharded)
    if curves is None:  # another rank: rank 0 has the curves and writes every output
        return None
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
    files.append(plot_overlays(out / "overlay.png", x, maps_np, signed, grid, title))
    mp = plot_mean_maps(out / "mean_maps.png", means, signed)
    if mp:
        files.append(mp)
    files.append(plot_curves(out / "curves.png", curves, title))
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
        "parts": parts_rows, "files": [str(p) for p in files], "notes": notes,
    }
    write_json(out / "metrics.json", metrics)
    metrics["files"].append(str(out / "metrics.json"))
    return metrics
