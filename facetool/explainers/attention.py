"""`facetool dissect attention`: where a response-based explainer's attention maps look.

Works with every model that reports the ``attention`` internal ((B, A, h, w) in [0, 1], A = 1 for a
single task or one map per attribute head; the ABN models). Over a split of a store, streamed in
batches (memory bounded by one batch):

* maps are upsampled bilinearly to the store's image size, each map cell placed on the centre of its
  receptive field (:func:`upsample_maps`): with "same"-padded convolutions cell j of a stride-s map
  is centred on input pixel s*j, not on s*(j + 0.5) - 0.5 as ``interpolate(align_corners=False)``
  assumes; that convention shifts the map by (s - 1)/2 px (7.5 px for ResNet's stride 16) down and
  to the right, and lowered the glasses-frame attention ratio of a trained ABN from 1.46 to 1.19;
* overlay grid (``overlays.png``): one row per image (the first ``images`` of the split, labelled
  with its store row and identity), the face then each head's map blended over it (up to
  ``max_heads``, columns labelled with the head's attribute), and a colour bar of the attention scale;
* mean map per attribute value (``mean_maps.png`` + ``mean_maps.npz``): head ``a``'s map averaged over
  the images whose value of the head's attribute is ``v`` (identity models: one "all" mean); rows
  labelled with the head, each map with its value and image count, a colour bar (map / its maximum);
* attention share per facial part (``part_shares.csv``): for each head and part, the mean over the
  images where the part is visible of ``sum(M * mask) / sum(M)`` beside the part's area share
  ``mean(mask)`` and their ratio (> 1: the map concentrates on the part). Parts come from the store's
  exact part masks (synthetic stores) or, without masks, from the 5 landmarks (discs around each eye,
  the nose tip and the mouth, radius 0.3 x the inter-ocular distance d, and the lower face: an ellipse
  with radii 0.9 d x 0.55 d centred 0.3 d below the mouth centre, where a beard grows).

``attention.json`` holds every number.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facetool.errors import FacetoolError
from facetool.explainers.placement import upsample_maps  # noqa: F401  (maps on receptive-field centres)

LANDMARK_PARTS = ("left_eye", "right_eye", "nose", "mouth", "lower_face")


def check_attention_model(model: torch.nn.Module, source: str | Path = "") -> None:
    if "attention" not in tuple(getattr(model, "internal_names", ())):
        from facetool.models.registry import list_models

        have = ", ".join(n for n in list_models("abn_"))
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise FacetoolError(f"model {source or name} ({name}) has no attention map; models with one: {have} "
                            "(train them with `facetool train abn`)")


def landmark_part_masks(landmarks: np.ndarray, size: tuple[int, int], radius: float = 0.3) -> dict[str, np.ndarray]:
    """Boolean (N, H, W) masks of :data:`LANDMARK_PARTS` from 5-point landmarks (N, 5, 2) in crop
    pixels (left eye, right eye, nose, left and right mouth corner); all False where landmarks are NaN."""
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    lm = np.asarray(landmarks, np.float32)
    iod = np.linalg.norm(lm[:, 1] - lm[:, 0], axis=1)
    r = radius * iod
    centres = {"left_eye": lm[:, 0], "right_eye": lm[:, 1], "nose": lm[:, 2], "mouth": (lm[:, 3] + lm[:, 4]) / 2}
    out = {}
    for name, c in centres.items():
        d2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
        rr = r if name != "mouth" else np.maximum(r, np.linalg.norm(lm[:, 4] - lm[:, 3], axis=1) / 2 + 0.1 * iod)
        m = d2 <= (rr ** 2)[:, None, None]
        m[~np.isfinite(rr)] = False
        out[name] = m
    # lower face (mouth, chin, jaw: where a beard grows): ellipse below the mouth centre
    c = centres["mouth"] + np.stack([np.zeros_like(iod), 0.3 * iod], 1)
    ex = ((xx[None] - c[:, 0, None, None]) / (0.9 * iod)[:, None, None]) ** 2
    ey = ((yy[None] - c[:, 1, None, None]) / (0.55 * iod)[:, None, None]) ** 2
    m = (ex + ey) <= 1.0
    m[~np.isfinite(iod)] = False
    out["lower_face"] = m
    return out


def part_shares(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For maps (N, A, H, W) >= 0 and one part's masks (N, H, W): per image and head the attention
    share ``sum(M * mask) / sum(M)`` (N, A), the area share ``mean(mask)`` (N,), and which images show
    the part (N,) bool."""
    m = masks.astype(np.float32)
    inside = np.einsum("nahw,nhw->na", maps, m)
    total = maps.sum((2, 3))
    share = inside / np.maximum(total, 1e-12)
    return share, m.mean((1, 2)), m.reshape(len(m), -1).any(1)


def _colour(map01: np.ndarray) -> np.ndarray:
    import cv2

    u8 = np.clip(map01 * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image with the [0, 1] map blended over it as a heat map."""
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * _colour(map01).astype(np.float32),
                   0, 255).astype(np.uint8)


def _colour_bar(fig, axes, label: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "jet"), ax=axes, label=label, fraction=0.04, pad=0.02)


def plot_overlays(path: Path, rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str]) -> Path:
    """``overlays.png``: one row per image (``(label, [face, overlay ...])``), columns labelled with
    ``columns`` (face, then the attribute head of each map), and the colour bar of the maps."""
    from facetool.explainers.dissect import _plt, _savefig

    plt = _plt()
    n, c = len(rows), len(columns)
    fig, axes = plt.subplots(n, c, figsize=(1.25 * c + 1.2, 1.3 * n + 0.5), squeeze=False)
    for i, (label, cells) in enumerate(rows):
        for j in range(c):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(cells):
                ax.imshow(cells[j])
            if i == 0:
                ax.set_title(columns[j], fontsize=7)
        axes[i][0].set_ylabel(label, fontsize=7)
    _colour_bar(fig, axes, "attention")
    return _savefig(fig, path)


def plot_mean_maps(path: Path, mean_maps: dict[str, dict[str, np.ndarray]], counts: dict[str, dict[str, int]]) -> Path:
    """``mean_maps.png``: one row per head, one map per attribute value (titled ``value (images)``),
    each divided by its maximum, and the colour bar of that scale."""
    from facetool.explainers.dissect import _plt, _savefig

    plt = _plt()
    n, c = len(mean_maps), max(len(d) for d in mean_maps.values())
    fig, axes = plt.subplots(n, c, figsize=(1.25 * c + 1.2, 1.35 * n + 0.5), squeeze=False)
    for i, (head, d) in enumerate(mean_maps.items()):
        for j in range(c):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(d):
                v, m = list(d.items())[j]
                ax.imshow(m / max(1e-12, float(m.max())), cmap="jet", vmin=0.0, vmax=1.0)
                ax.set_title(f"{v} ({counts[head][v]})", fontsize=7)
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(head, fontsize=7)
    _colour_bar(fig, axes, "mean attention / map maximum")
    return _savefig(fig, path)


@torch.no_grad()
def dissect_attention(model_path: str | Path, store: str | Path, out: str | Path, *, split: str = "test",
                      batch_size: int = 32, images: int = 8, max_heads: int = 8, overwrite: bool = False,
                      device: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """Run the analysis (see module doc); writes into the folder ``out``; returns the summary dict.
    ``arch``: the architecture of a model file that records none; ``device``: where the model runs."""
    from facetool.data import face_source, make_loader, open_dataset
    from facetool.devices import resolve_device
    from facetool.io import guard_output, write_json, write_text
    from facetool.models import load_model
    from facetool.store import FaceStore
    from facetool.tasks import task_of

    dev = torch.device(resolve_device(device))  # before any work
    if batch_size < 1 or images < 0 or max_heads < 1:
        raise FacetoolError("--batch-size and --max-heads must be >= 1 and --images >= 0")
    out = guard_output(out, inputs=(model_path, store), overwrite=overwrite, is_dir=True)
    model = load_model(model_path, name=arch)
    check_attention_model(model, model_path)
    task = task_of(model)
    with FaceStore(face_source(store)) as s:
        H, W = s.image_size
        idx_all = s.indices(split)
        if not len(idx_all):
            raise FacetoolError(f"split {split!r} of {store} has no images")
        parts = s.parts
        have_lm = bool(np.isfinite(s.landmarks[idx_all]).all(axis=(1, 2)).any())
        group_names = [n for n in task.names] if not task.is_identity else []
        have_attr = set(s.attribute_names("image")) | set(s.attribute_names("identity"))
        missing = [n for n in group_names if n not in have_attr]
        if missing:
            raise FacetoolError(f"store {Path(store).name} lacks the model's attribute(s) {', '.join(missing)}")
        codes = {n: s.attribute(n) for n in group_names}
        landmarks = s.landmarks
        identity_of = s.labels
        identity_names = list(s.identities)
    heads = list(task.names) if not task.is_identity else ["identity"]
    insize = int(getattr(model, "config", {}).get("input_size") or H)
    ds = open_dataset(store, split, size=insize if insize != H else None)
    model.eval().to(dev)
    stride = getattr(model, "attention_stride", None)

    A = None
    sums: dict[tuple[int, int], np.ndarray] = {}
    counts: dict[tuple[int, int], int] = {}
    part_names = list(parts) if parts else (list(LANDMARK_PARTS) if have_lm else [])
    share_sum = {p: None for p in part_names}
    area_sum = {p: 0.0 for p in part_names}
    n_part = {p: 0 for p in part_names}
    grid_rows: list[tuple[str, list[np.ndarray]]] = []  # (image label, [face, overlay per head])
    n_seen = 0
    with FaceStore(store) as s:
        for batch in make_loader(ds, batch_size):
            x = batch["image"].to(dev)
            _, it = model(x, return_internals=True)
            maps_t = it["attention"].float()
            if maps_t.dim() != 4:
                raise FacetoolError(f"attention internal has shape {tuple(maps_t.shape)}; expected (B, A, h, w)")
            maps = upsample_maps(maps_t, (H, W), (insize, insize), stride).clamp(0, 1).cpu().numpy()
            A = maps.shape[1]
            rows = batch["index"].numpy()
            # mean maps per attribute value of each head
            for a in range(A):
                if task.is_identity or task.num_heads != A:
                    keys = np.zeros(len(rows), np.int64)
                else:
                    keys = codes[task.names[a]][0][rows]
                for v in np.unique(keys):
                    if v < 0:
                        continue
                    sel = keys == v
                    sums[(a, int(v))] = sums.get((a, int(v)), 0) + maps[sel, a].sum(0)
                    counts[(a, int(v))] = counts.get((a, int(v)), 0) + int(sel.sum())
            # attention share per part
            if part_names:
                pm = ({p: s.part_masks(rows, p) for p in part_names} if parts else
                      landmark_part_masks(landmarks[rows], (H, W)))
                for p in part_names:
                    share, area, present = part_shares(maps, pm[p])
                    if present.any():
                        add = share[present].sum(0)
                        share_sum[p] = add if share_sum[p] is None else share_sum[p] + add
                        area_sum[p] += float(area[present].sum())
                        n_part[p] += int(present.sum())
            # overlays
            if n_seen < images:
                take = min(images - n_seen, len(rows))
                imgs = s.images(rows[:take])
                for k in range(take):
                    cells = [imgs[k]] + [overlay(imgs[k], maps[k, a]) for a in range(min(A, max_heads))]
                    y = int(identity_of[rows[k]])
                    who = identity_names[y] if 0 <= y < len(identity_names) else str(y)
                    grid_rows.append((f"#{int(rows[k])}\n{who}", cells))
            n_seen += len(rows)

    out.mkdir(parents=True, exist_ok=True)  # everything is computed: write the files now
    files = []
    head_names = heads if len(heads) == A else [f"map{a}" for a in range(A)]
    if grid_rows:
        plot_overlays(out / "overlays.png", grid_rows, ["face"] + head_names[:max_heads])
        files.append("overlays.png")
    mean_maps: dict[str, dict[str, np.ndarray]] = {}
    mean_counts: dict[str, dict[str, int]] = {}
    for (a, v), sm in sorted(sums.items()):
        hn = head_names[a]
        vocab = task.vocab[a] if not task.is_identity and task.num_heads == A else ["all"]
        vn = vocab[v] if v < len(vocab) else str(v)
        mean_maps.setdefault(hn, {})[vn] = sm / counts[(a, v)]
        mean_counts.setdefault(hn, {})[vn] = counts[(a, v)]
    if mean_maps:
        plot_mean_maps(out / "mean_maps.png", dict(list(mean_maps.items())[:max_heads]), mean_counts)
        buf = io.BytesIO()
        np.savez_compressed(buf, **{f"{hn}={v}": m.astype(np.float32) for hn, d in mean_maps.items() for v, m in d.items()})
        from facetool.io import atomic_path

        with atomic_path(out / "mean_maps.npz") as tmp:
            tmp.write_bytes(buf.getvalue())
        files += ["mean_maps.png", "mean_maps.npz"]
    shares = []
    for p in part_names:
        if not n_part[p]:
            continue
        area = area_sum[p] / n_part[p]
        for a in range(A):
            sh = float(share_sum[p][a] / n_part[p])
            shares.append({"head": head_names[a], "part": p, "attention_share": sh, "area_share": area,
                           "ratio": sh / area if area > 0 else float("nan"), "images": n_part[p]})
    if shares:
        sio = io.StringIO()
        w = csv.DictWriter(sio, fieldnames=list(shares[0]))
        w.writeheader()
        w.writerows(shares)
        write_text(out / "part_shares.csv", sio.getvalue())
        files.append("part_shares.csv")
    summary = {"model": str(model_path), "store": str(store), "split": split, "images": n_seen, "maps": A,
               "heads": head_names, "task": task.to_json(), "map_size_model": list(maps_t.shape[-2:]),
               "map_stride": stride or insize / maps_t.shape[-1], "map_alignment": "receptive-field centres",
               "part_source": "part_masks" if parts else ("landmarks" if part_names else None),
               "part_shares": shares,
               "mean_map_mean": {hn: {v: float(m.mean()) for v, m in d.items()} for hn, d in mean_maps.items()},
               "files": files + ["attention.json"]}
    write_json(out / "attention.json", summary)
    return summary


def shares_table(shares: Sequence[dict], top: int = 3) -> list[dict]:
    """Per head the ``top`` parts by ratio (for the console)."""
    by: dict[str, list[dict]] = {}
    for r in shares:
        by.setdefault(r["head"], []).append(r)
    rows = []
    for h, rs in by.items():
        for r in sorted(rs, key=lambda r: -r["ratio"])[:top]:
            rows.append({"head": h, "part": r["part"], "attention %": 100 * r["attention_share"],
                         "area %": 100 * r["area_share"], "ratio": r["ratio"], "images": r["images"]})
    return rows
