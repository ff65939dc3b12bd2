"""Self-contained HTML report of a unit dissection (PNGs embedded as base64; no network needed), and
:func:`dissect_to_folder`, which runs a dissection and writes the report, tally and JSON."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from facetool.errors import FacetoolError
from facetool.explainers.placement import upsample_maps
from facetool.explainers.units.dissect import (IOU_THRESHOLD, QUANTILE, Dissection, _check_layers, _model_input,
                                             as_serialisable, compare_dissections, dissect_units, parse_layers)
from facetool.explainers.units.dictionary import FaceDictionary, landmark_polygons
from facetool.hooks import taps

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}.unit{border-top:1px solid #ddd;padding:.4em 0}
.unit img{margin-right:3px;border:1px solid #999}.kind-local{color:#060}.kind-global{color:#00a}.kind-none{color:#888}
.note{color:#555;font-size:13px}"""


def png_b64(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _img_tag(img: np.ndarray, title: str = "", scale: int = 1) -> str:
    if scale > 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    return f'<img src="{png_b64(img)}" title="{html.escape(title)}">'


def overlay(image: np.ndarray, unit_mask: np.ndarray | None, concept_mask: np.ndarray | None) -> np.ndarray:
    """Unit mask tinted red with its outline, concept mask outlined green."""
    out = image.astype(np.float32).copy()
    if unit_mask is not None and unit_mask.any():
        out[unit_mask] = 0.55 * out[unit_mask] + 0.45 * np.array([255, 40, 40], np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    for m, col in ((unit_mask, (255, 0, 0)), (concept_mask, (0, 255, 0))):
        if m is not None and m.any():
            cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, cs, -1, col, 1)
    return out


def _table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p class=note>(none)</p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def geometry_figure(dictionary: FaceDictionary, n: int = 4) -> str:
    """A few dictionary faces with their concept masks (colours) and, where the store has
    landmarks, the landmark-derived part outlines (yellow)."""
    rows = np.linspace(0, len(dictionary) - 1, min(n, len(dictionary))).round().astype(int)
    b = dictionary.batch(rows)
    rng = np.random.default_rng(3)
    cols = rng.integers(40, 255, (len(dictionary.concepts), 3)).astype(np.float32)
    tiles = []
    lms = getattr(dictionary, "lms", None)
    for j, r in enumerate(rows):
        img = b.images[j].astype(np.float32)
        for k in range(len(dictionary.concepts)):
            m = b.masks[j, k]
            img[m] = 0.45 * img[m] + 0.55 * cols[k]
        top = img.clip(0, 255).astype(np.uint8)
        bot = b.images[j].copy()
        if lms is not None and np.isfinite(lms[r]).all():
            for poly in landmark_polygons(lms[r]).values():
                cv2.polylines(bot, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], True, (255, 255, 0), 1)
            for p in lms[r]:
                cv2.circle(bot, (int(round(p[0])), int(round(p[1]))), 1, (255, 0, 255), -1)
        tiles.append(np.concatenate([top, bot], 0))
    grid = np.concatenate(tiles, 1)
    legend = " ".join(f'<span style="background:rgb({int(c[0])},{int(c[1])},{int(c[2])});padding:0 4px">'
                      f'{html.escape(dictionary.concepts[k].name)}</span>' for k, c in enumerate(cols))
    return (_img_tag(grid, "dictionary masks (top) and landmark geometry (bottom)", 2 if grid.shape[0] < 160 else 1)
            + f"<p class=note>top: concept masks; bottom: parts drawn from the 5 landmarks (yellow), landmarks "
              f"(magenta). {legend}</p>")


def unit_maps(model, dictionary: FaceDictionary, layer: str, rows: Sequence[int], batch_size: int = 32,
              device: str | None = None) -> dict[int, torch.Tensor]:
    """Upsampled (U, H, W) maps of ``layer`` for the given dictionary rows."""
    dev = torch.device(device or "cpu")
    rows = sorted(set(int(r) for r in rows))
    H, W = dictionary.size
    in_size = (getattr(model, "config", {}) or {}).get("input_size")
    in_size = int(in_size) if in_size and int(in_size) != H else None
    out: dict[int, torch.Tensor] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), taps(model, [layer], detach=True, first=True) as found:
            for a in range(0, len(rows), batch_size):
                rs = np.array(rows[a:a + batch_size])
                b = dictionary.batch(rs)
                model(_model_input(b.images, in_size, dev))
                up = upsample_maps(found[layer].float(), (H, W), (in_size or H, in_size or W)).cpu()
                for j, r in enumerate(rs):
                    out[int(r)] = up[j]
    finally:
        model.train(was)
    return out


def render_report(results: dict[str, Dissection], models: dict[str, object], dictionary: FaceDictionary, *,
                  compare_rows: list[dict] | None = None, max_units: int = 48, title: str = "Unit dissection",
                  device: str | None = None) -> str:
    """The HTML page: settings, dictionary (with the landmark geometry), per model and layer the counts
    of units by concept type, links, and per unit its concepts, probabilities and top images."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    first = next(iter(results.values()))
    st = first.settings
    parts.append(f"<p>Hierarchical Network Dissection: per-unit top-{st['quantile']:g} quantile thresholds, bilinear "
                 f"upsampling, IoU over images carrying the concept, localizable at IoU &ge; {st['iou_threshold']:g}; "
                 f"region pairing keeps P &gt; 1.5/|region|; global groups biased at P &ge; 1/k + 0.05 "
                 f"(0.55 two-way, 0.3 four-way). A <b>link</b> = a unit holding a local concept and biased to a "
                 f"subgroup; '(predicted)' groups are the model's own outputs on the dictionary images.</p>")
    # dictionary
    d = first.dictionary
    parts.append("<h2>Face dictionary</h2>")
    parts.append(f"<p class=note>{html.escape(d['source'])}: {d['images']} images {d['size'][0]}&times;{d['size'][1]}. "
                 + html.escape("; ".join(d.get("notes", []))) + "</p>")
    if d.get("skipped"):
        parts.append("<p class=note>skipped: " + html.escape(", ".join(f"{k}: {v}" for k, v in d["skipped"].items())) + "</p>")
    parts.append(_table(d["concepts"], ["name", "kind", "region", "source", "images"]))
    parts.append(_table([{"group": g["name"], "values": ", ".join(f"{v} ({n})" for v, n in g["images"].items())}
                         for g in d["groups"]]))
    parts.append(geometry_figure(dictionary))
    if compare_rows is not None:
        names = list(results)
        parts.append(f"<h2>Bias discovery: {html.escape(names[0])} vs {html.escape(names[1])}</h2>"
                     "<p class=note>links whose share of the layer's units differs most, largest first</p>")
        parts.append(_table(compare_rows[:40]))
    for mname, res in results.items():
        model = models[mname]
        parts.append(f"<h2>Model {html.escape(mname)}</h2><p class=note>{res.timing.get('images', 0)} images, "
                     f"{res.timing.get('total_s', 0):.1f} s</p>")
        parts += [f"<p class=note>note: {html.escape(n)}</p>" for n in res.notes]
        for lname, lr in res.layers.items():
            U, h, w = lr.shape
            parts.append(f"<h3>{html.escape(mname)} / {html.escape(lname)} ({U} units, {h}&times;{w})</h3>")
            parts.append(_table([lr.counts(dictionary.concepts)]))
            cu = lr.concept_units()
            if cu:
                parts.append(_table([{"concept": c, "units": n} for c, n in sorted(cu.items(), key=lambda t: -t[1])]))
            links = lr.links()
            if links:
                parts.append("<p>links (concept &ndash; subgroup: units)</p>")
                parts.append(_table([{"concept": c, "subgroup": g, "units": n}
                                     for (c, g), n in sorted(links.items(), key=lambda t: -t[1])[:30]]))
            shown = [u for u in lr.units if u.kind != "none"]
            shown.sort(key=lambda u: (u.kind != "local", -u.best_iou))
            shown = shown[:max_units]
            if not shown:
                continue
            rows = sorted({r for u in shown for r in u.top_images[:4]})
            maps = unit_maps(model, dictionary, lname, rows, device=device)
            batch = {int(r): j for j, r in enumerate(rows)}
            b = dictionary.batch(np.array(rows)) if rows else None
            names = [c.name for c in dictionary.concepts]
            for u in shown:
                cname = u.concepts[0] if u.concepts else u.best_concept
                k = names.index(cname) if cname in names else None
                imgs = []
                for r in u.top_images[:4]:
                    j = batch[int(r)]
                    um = (maps[int(r)][u.unit] > u.threshold).numpy()
                    cm = b.masks[j, k] if k is not None else None
                    imgs.append(_img_tag(overlay(b.images[j], um, cm), f"row {r}", max(1, 96 // dictionary.size[0])))
                probs = ", ".join(f"{c} {u.probs.get(c, 0):.2f}" for c in u.concepts) or "\u2013"  # escaped below
                allp = ", ".join(f"{c} {p:.2f}" for c, p in sorted(u.probs.items(), key=lambda t: -t[1]))
                parts.append(
                    f"<div class=unit><b>unit {u.unit}</b> <span class='kind-{u.kind}'>{u.kind}</span> "
                    f"{html.escape(u.region)} &middot; holds: <b>{html.escape(probs)}</b> &middot; best IoU "
                    f"{u.best_iou:.3f} ({html.escape(u.best_concept)}) &middot; biased: "
                    f"{html.escape(', '.join(u.biased) or '-')}<br><span class=note>region P: {html.escape(allp)}</span>"
                    f"<br>{''.join(imgs)}<span class=note> red: unit mask; green: {html.escape(cname)}</span></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def dissect_to_folder(
    out: str | Path,
    *,
    models: Sequence[str | Path],
    layers: str | Sequence[str],
    store: str | Path | None = None,
    dictionary_csv: str | Path | None = None,
    split: str = "all",
    limit: int | None = None,
    quantile: float = QUANTILE,
    iou_threshold: float = IOU_THRESHOLD,
    batch_size: int = 32,
    device: str | None = None,
    top_images: int = 6,
    max_units: int = 48,
    overwrite: bool = False,
    compare: bool = False,
    progress=None,
    arch: str | None = None,
) -> dict | None:
    """Dissect one model (or, with ``compare``, two: biased then clean) and write ``report.html``,
    ``tally.csv``, ``dissection.json`` (and ``compare.csv``) to ``out``. Returns a summary dict
    (``notes``: (model, note) pairs saying what was dropped and why). ``arch``: the architecture of
    model files that record none (``--arch``). Under ``torchrun`` the activation passes are split over the
    ranks and rank 0 writes (the other ranks get None)."""
    import pandas as pd

    from facetool.devices import resolve_device
    from facetool.errors import require_file
    from facetool.io import guard_output, write_json, write_text
    from facetool.explainers.units.dictionary import load_dictionary
    from facetool.models import load_model

    device = resolve_device(device)  # before any work
    models = [Path(m) for m in models]
    if compare and len(models) != 2:
        raise FacetoolError("--compare needs two checkpoints: the suspect (biased) model and the reference (clean) one")
    if not models:
        raise FacetoolError("give --model (or --compare BIASED.pt CLEAN.pt)")
    for m in models:
        require_file(m, "model")
    layer_names = parse_layers(layers)
    out = guard_output(out, inputs=(*models, store, dictionary_csv), overwrite=overwrite, is_dir=True)
    if not 0.0 < quantile < 0.5:
        raise FacetoolError(f"--quantile must be in (0, 0.5), got {quantile}")
    loaded = {}
    for m in models:
        model = load_model(m, name=arch)
        if not hasattr(model, "get_layer"):
            raise FacetoolError(f"{m} is not a facetool model with named layers (ONNX models cannot be dissected)")
        _check_layers(model, layer_names)
        loaded[m] = model
    stems = [m.stem for m in models]
    labels = [m.parent.name or m.stem if stems.count(m.stem) > 1 or m.stem in ("model", "last") else m.stem for m in models]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
    loaded = {lab: loaded[m] for lab, m in zip(labels, models)}
    dictionary = load_dictionary(store, dictionary_csv, split=split, limit=limit)
    try:
        results: dict[str, Dissection] = {}
        for name, model in loaded.items():
            res = dissect_units(model, dictionary, layer_names, quantile=quantile, iou_threshold=iou_threshold,
                                batch_size=batch_size, device=device, top_images=top_images, progress=progress)
            if res is None:  # another torchrun rank's share: rank 0 merges and writes
                continue
            results[name] = res
        if not results:
            return None
        names = list(results)
        rows = compare_dissections(results[names[0]], results[names[1]], (names[0], names[1])) if compare else None
        out.mkdir(parents=True, exist_ok=True)
        tally = []
        for name, res in results.items():
            tally += [{"model": name, **r} for r in res.tally(dictionary.concepts)]
        write_text(out / "tally.csv", pd.DataFrame(tally).to_csv(index=False))
        files = ["tally.csv"]
        if rows is not None:
            write_text(out / "compare.csv", pd.DataFrame(rows).to_csv(index=False))
            files.append("compare.csv")
        summary = {"models": {n: str(m) for n, m in zip(names, models)},
                   "counts": {n: {ln: lr.counts(dictionary.concepts) for ln, lr in r.layers.items()}
                              for n, r in results.items()},
                   "compare": rows[:50] if rows is not None else None}
        write_json(out / "dissection.json", as_serialisable(
            {**summary, "results": {n: r.to_json() for n, r in results.items()}}))
        files.append("dissection.json")
        page = render_report(results, loaded, dictionary, compare_rows=rows, max_units=max_units,
                             title="Unit dissection: " + " vs ".join(names), device="cpu")
        write_text(out / "report.html", page)
        files.append("report.html")
        summary["files"] = files
        summary["results"] = results  # the Dissection objects (library callers; not written to JSON)
        summary["timing"] = {n: r.timing for n, r in results.items()}
        summary["dictionary"] = {"images": len(dictionary), "concepts": len(dictionary.concepts),
                                 "groups": [g.name for g in dictionary.groups], "skipped": dictionary.skipped,
                                 "notes": list(dictionary.notes)}
        summary["notes"] = [(n, note) for n, r in results.items() for note in r.notes]
        return summary
    finally:
        dictionary.close()
