"""IJB-B / IJB-C evaluation on the insightface layout: 1:1 verification (TAR@FAR) and 1:N search.

Layout under ``root`` (prefix ``ijbc`` or ``ijbb``), space separated, no header::

    meta/<prefix>_face_tid_mid.txt          img_name template_id media_id
    meta/<prefix>_template_pair_label.txt   tid1 tid2 label
    meta/<prefix>_name_5pts_score.txt       img_name x1 y1 ... x5 y5 faceness_score
    loose_crop/<img_name>
    meta/<prefix>_1N_gallery_G1.csv, _G2.csv, <prefix>_1N_probe_mixed.csv   (1:N, NIST CSVs)

Protocol (insightface): align each image on its 5 points; image feature = f(crop) + f(flipped crop)
(switch F); L2-normalise it unless N; multiply by the faceness score if D; within a template average the
images of each media, sum the media features, L2-normalise; pair score = dot product.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from facetool.errors import FacetoolError
from facetool.eval import roc as roc_mod
from facetool.eval.embed import (
    CROP_SIZE,
    FeatureCache,
    ImageFiles,
    cache_key,
    dataset_fingerprint,
    extract,
    model_fingerprint,
    preprocessing,
)
from facetool.models.features import input_size_of, require_embedder

PREFIXES = ("ijbc", "ijbb")


@dataclass
class IJBMeta:
    """One IJB distribution's meta files, as arrays (one row per image / per pair)."""

    root: Path
    prefix: str
    files: list[str]  # image names in loose_crop/
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    pairs: np.ndarray  # (P, 2) int64 template ids
    labels: np.ndarray  # (P,) int8

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def _meta_file(root: Path, prefix: str, suffix: str) -> Path:
    p = root / "meta" / f"{prefix}_{suffix}"
    if not p.is_file():
        raise FacetoolError(f"missing IJB meta file {p} (insightface layout: meta/{prefix}_{suffix})")
    return p


def _read_table(path: Path, ncols: int, int_cols: bool = False) -> np.ndarray:
    """A whitespace-separated table with ``ncols`` fields per line: (rows, ncols) str, or int64."""
    text = path.read_text()
    n_lines = sum(1 for ln in text.splitlines() if ln.strip())
    if int_cols:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                vals = np.fromstring(text, dtype=np.int64, sep=" ")  # C parser; stops on a bad token
            except (DeprecationWarning, ValueError):
                raise FacetoolError(f"{path}: expected {ncols} integers per line") from None
    else:
        vals = np.array(text.split(), dtype=object)
    if len(vals) != n_lines * ncols:
        raise FacetoolError(f"{path}: expected {ncols} fields on each of its {n_lines} lines")
    return vals.reshape(n_lines, ncols)


def _as(vals: np.ndarray, dtype: type, path: Path) -> np.ndarray:
    try:
        return vals.astype(dtype)
    except (ValueError, TypeError):
        raise FacetoolError(f"{path}: non-numeric value where a number is expected") from None


def read_meta(root: str | Path, prefix: str = "ijbc", check_images: bool = True) -> IJBMeta:
    """Read and cross-check the three meta files (and that every listed image exists)."""
    root = Path(root)
    if not root.is_dir():
        raise FacetoolError(f"IJB root folder not found: {root}")
    if prefix not in PREFIXES:
        raise FacetoolError(f"unknown IJB prefix {prefix!r}; expected one of {PREFIXES}")
    p_tid = _meta_file(root, prefix, "face_tid_mid.txt")
    p_pair = _meta_file(root, prefix, "template_pair_label.txt")
    p_pts = _meta_file(root, prefix, "name_5pts_score.txt")
    tid = _read_table(p_tid, 3)
    pts = _read_table(p_pts, 12)
    pair = _read_table(p_pair, 3, int_cols=True)
    files = pts[:, 0].tolist()
    vals = _as(pts[:, 1:], np.float32, p_pts)
    tid_names = tid[:, 0].tolist()
    if tid_names != files:  # insightface assumes the same order; join by name otherwise
        pos = {n: i for i, n in enumerate(files)}
        missing = [n for n in tid_names if n not in pos]
        if missing:
            raise FacetoolError(f"{len(missing)} image(s) of {p_tid.name} have no landmarks in {p_pts.name}, "
                                f"e.g. {missing[0]}")
        order = np.array([pos[n] for n in tid_names])
        files, vals = tid_names, vals[order]
    tm = _as(tid[:, 1:], np.int64, p_tid)
    meta = IJBMeta(root, prefix, files, vals[:, :10].reshape(-1, 5, 2), vals[:, 10], tm[:, 0], tm[:, 1],
                   pair[:, :2], pair[:, 2].astype(np.int8))
    known = np.unique(meta.templates)
    unknown = np.setdiff1d(np.unique(meta.pairs), known)
    if len(unknown):
        raise FacetoolError(f"{p_pair.name} names {len(unknown)} template(s) without images in {p_tid.name}, "
                            f"e.g. {unknown[0]}")
    if not np.isin(meta.labels, (0, 1)).all():
        raise FacetoolError(f"{p_pair.name}: labels must be 0 or 1")
    if check_images:
        if not meta.image_dir.is_dir():
            raise FacetoolError(f"IJB image folder not found: {meta.image_dir}")
        present = _listing(meta.image_dir, meta.files)
        absent = [n for n in meta.files if n not in present]
        if absent:
            raise FacetoolError(f"{len(absent)} image(s) listed in {p_pts.name} are absent from "
                                f"{meta.image_dir}, e.g. {absent[0]}")
    return meta


def _listing(folder: Path, names: list[str]) -> set[str]:
    """Names present under ``folder`` (one directory listing; nested names are checked one by one)."""
    present = set(os.listdir(folder))
    return present | {n for n in names if "/" in n and (folder / n).is_file()}


# ---------------------------------------------------------------------------------------- features


def image_features(feats: np.ndarray, flip_feats: np.ndarray | None, faceness: np.ndarray, *,
                   norm: bool = True, det_score: bool = True, flip: bool = True) -> np.ndarray:
    """insightface's per-image feature under the switches N (keep norm), D (faceness), F (flip)."""
    if flip and flip_feats is None:
        raise FacetoolError("flip features were not extracted; pass them or turn flip off")
    x = feats + flip_feats if flip else feats.copy()
    if not norm:
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if det_score:
        x = x * np.asarray(faceness, np.float32)[:, None]
    return x.astype(np.float32, copy=False)


def template_features(img_feats: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average the images of each (template, media), sum the media of each template, L2-normalise.

    Returns ``(template_ids sorted, float64 features (T, D))`` (float64 as insightface accumulates).
    """
    tm = np.stack([templates, medias], 1)
    groups, g_of = np.unique(tm, axis=0, return_inverse=True)
    g_of = g_of.reshape(-1)
    x = torch.from_numpy(np.ascontiguousarray(img_feats, np.float64))
    gsum = torch.zeros(len(groups), x.shape[1], dtype=torch.float64).index_add_(0, torch.from_numpy(g_of), x)
    gcount = np.bincount(g_of, minlength=len(groups)).astype(np.float64)
    gmean = gsum / torch.from_numpy(gcount)[:, None]
    tids, t_of = np.unique(groups[:, 0], return_inverse=True)
    tsum = torch.zeros(len(tids), x.shape[1], dtype=torch.float64)
    tsum.index_add_(0, torch.from_numpy(t_of.reshape(-1)), gmean)
    t = tsum.numpy()
    return tids, t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-300)


# ---------------------------------------------------------------------------------------- scoring

#: below this share of needed entries in a block's score matrix, gather rows instead of a matmul
_MIN_DENSITY = 1 / 32


def pair_scores(feats: np.ndarray, i1: np.ndarray, i2: np.ndarray, max_block: int = 1 << 24) -> np.ndarray:
    """``scores[k] = feats[i1[k]] · feats[i2[k]]`` for millions of pairs in bounded memory.

    Pairs are grouped by their first template; each group of rows is scored against all the second
    templates with one matrix product (at most ``max_block`` entries) and the needed entries are
    picked, unless the block is too sparse, where the rows are gathered and dotted in chunks.
    Grouping uses counting (no sort of the pairs unless they are out of order).
    """
    i1, i2 = np.asarray(i1, np.int64), np.asarray(i2, np.int64)
    T = len(feats)
    F = torch.from_numpy(np.ascontiguousarray(feats))
    n1, n2 = np.bincount(i1, minlength=T), np.bincount(i2, minlength=T)
    if np.count_nonzero(n2) > np.count_nonzero(n1):  # the side with fewer templates is the columns
        i1, i2, n1, n2 = i2, i1, n2, n1
    cols = np.flatnonzero(n2)
    col_lut = np.zeros(T, np.int64)
    col_lut[cols] = np.arange(len(cols))
    Fc = F[torch.from_numpy(cols)]
    C = len(cols)
    order = np.arange(len(i1)) if (len(i1) < 2 or (np.diff(i1) >= 0).all()) else np.argsort(i1, kind="stable")
    urows = np.flatnonzero(n1)
    starts = np.r_[0, np.cumsum(n1[urows])]
    out = np.empty(len(i1), feats.dtype)
    step = max(1, max_block // max(C, 1))
    t1, t2 = torch.from_numpy(i1), torch.from_numpy(i2)
    for b in range(0, len(urows), step):
        rs = urows[b: b + step]
        s0, s1 = starts[b], starts[b + len(rs)]
        sel = order[s0:s1]
        if (s1 - s0) >= _MIN_DENSITY * len(rs) * C:
            row_lut = np.zeros(T, np.int64)
            row_lut[rs] = np.arange(len(rs))
            G = F[torch.from_numpy(rs)] @ Fc.T
            out[sel] = G[torch.from_numpy(row_lut[i1[sel]]), torch.from_numpy(col_lut[i2[sel]])].numpy()
        else:
            chunk = max(1, max_block // F.shape[1])
            for c0 in range(0, len(sel), chunk):
                s = torch.from_numpy(sel[c0: c0 + chunk])
                out[s.numpy()] = torch.einsum("ij,ij->i", F[t1[s]], F[t2[s]]).numpy()
    return out


def template_index(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``wanted`` template ids in the sorted ``template_ids``; unknown ids are an error."""
    pos = np.searchsorted(template_ids, wanted).clip(0, len(template_ids) - 1)
    bad = template_ids[pos] != wanted
    if bad.any():
        raise FacetoolError(f"{what} names {len(np.unique(wanted[bad]))} unknown template(s), e.g. {wanted[bad][0]}")
    return pos


def verify(template_ids: np.ndarray, tfeats: np.ndarray, pairs: np.ndarray, labels: np.ndarray,
           fars=roc_mod.FARS) -> dict[str, Any]:
    """1:1 verification: pair scores, ROC and TAR@FAR."""
    a = template_index(template_ids, pairs[:, 0], "pair list")
    b = template_index(template_ids, pairs[:, 1], "pair list")
    scores = pair_scores(tfeats, a, b)
    tars, fpr, tpr = roc_mod.verification_tars(labels, scores, fars)
    return {"tar_at_far": tars, "roc": (fpr, tpr), "scores": scores}


# ---------------------------------------------------------------------------------------- 1:N


def read_1n_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NIST 1:N CSV (with or without SIGHTING_ID) -> (template ids, subject ids), one per template."""
    import csv

    if not path.is_file():
        raise FacetoolError(f"missing IJB 1:N file {path}")
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = [c.strip().upper() for c in next(r, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise FacetoolError(f"{path} lacks the TEMPLATE_ID,SUBJECT_ID columns of a NIST 1:N CSV")
        it, isub = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        seen: dict[int, int] = {}
        try:
            for row in r:
                if row:
                    seen.setdefault(int(row[it]), int(row[isub]))
        except (ValueError, IndexError):
            raise FacetoolError(f"{path} line {r.line_num}: bad TEMPLATE_ID / SUBJECT_ID") from None
    if not seen:
        raise FacetoolError(f"{path} lists no templates")
    return np.fromiter(seen.keys(), np.int64), np.fromiter(seen.values(), np.int64)


def _find_1n(root: Path, prefix: str, name: str) -> Path:
    for p in (root / "meta" / f"{prefix}_{name}", root / f"{prefix}_{name}"):
        if p.is_file():
            return p
    raise FacetoolError(f"missing IJB 1:N file meta/{prefix}_{name} under {root}")


def identify(root: Path, prefix: str, template_ids: np.ndarray, tfeats: np.ndarray,
             fpirs=roc_mod.FPIRS) -> dict[str, Any]:
    """1:N mixed-media search of the probe templates in gallery G1 and G2 (and their mean)."""
    p_tids, p_subj = read_1n_csv(_find_1n(root, prefix, "1N_probe_mixed.csv"))
    probe = tfeats[template_index(template_ids, p_tids, "1:N probe list")]
    out: dict[str, Any] = {}
    for g in ("G1", "G2"):
        try:
            path = _find_1n(root, prefix, f"1N_gallery_{g}.csv")
        except FacetoolError:
            if g == "G1":
                raise
            continue
        g_tids, g_subj = read_1n_csv(path)
        gal = tfeats[template_index(template_ids, g_tids, f"1:N gallery {g}")]
        scores = probe @ gal.T
        res = {**roc_mod.cmc(scores, g_subj, p_subj),
               **{f"tpir@fpir={k}": v for k, v in roc_mod.tpir_at_fpir(scores, g_subj, p_subj, fpirs).items()}}
        res["probes"] = int(len(p_tids))
        res["mated_probes"] = int(np.isin(p_subj, g_subj).sum())
        out[g] = res
    if len(out) == 2:
        out["mean"] = {k: float(np.mean([out["G1"][k], out["G2"][k]])) for k in out["G1"]
                       if k not in ("probes", "mated_probes")}
    return out


# ---------------------------------------------------------------------------------------- driver


def evaluate_ijb(
    model: Any,
    root: str | Path,
    *,
    prefix: str = "ijbc",
    model_path: str | Path | None = None,
    batch_size: int = 256,
    norm: bool = True,
    det_score: bool = True,
    flip: bool = True,
    device: str = "cpu",
    workers: int = 0,
    cache: str | Path | None = None,
    one_to_n: bool = False,
    progress: Callable[[int, int], None] | None = None,
    sharded: bool = False,
) -> dict[str, Any] | None:
    """Run the IJB 1:1 (and optionally 1:N) protocol. ``progress(done, total)`` reports extraction.

    The model gets the aligned 112-px crops resized to its own input size (``input_size`` in the
    results). Returns the results dict; ``"roc"`` holds the (fpr, tpr) arrays (not JSON). ``sharded``
    (under ``torchrun``): extraction is split over the ranks, the cache written and the metrics computed
    on rank 0, which alone gets the results (None elsewhere)."""
    require_embedder(model)
    meta = read_meta(root, prefix)
    images = ImageFiles([str(meta.image_dir / n) for n in meta.files], meta.landmarks, size=CROP_SIZE)
    n = len(images)
    size = input_size_of(model)
    report = (lambda d: progress(d, n)) if progress else None
    if cache is not None:
        key = cache_key(model_fingerprint(model, model_path),
                        dataset_fingerprint(meta.root, meta.files, meta.landmarks), preprocessing(size))
        got = FeatureCache(cache).extract(key, model, images, flip=flip, batch_size=batch_size, device=device,
                                          workers=workers, progress=report, sharded=sharded)
        if got is None:
            return None
        feats, flips, extracted = got
    else:
        feats_flips = extract(model, images, batch_size, flip, device, workers, sharded=sharded)
        if feats_flips is None:
            return None
        feats, flips = feats_flips
        extracted = n
        if report:
            report(n)
    img = image_features(feats, flips, meta.faceness, norm=norm, det_score=det_score, flip=flip)
    tids, tfeats = template_features(img, meta.templates, meta.medias)
    res = verify(tids, tfeats, meta.pairs, meta.labels)
    out: dict[str, Any] = {
        "protocol": f"{prefix}-1:1",
        "root": str(meta.root),
        "images": n,
        "templates": int(len(tids)),
        "pairs": int(len(meta.pairs)),
        "genuine_pairs": int(meta.labels.sum()),
        "switches": {"norm": norm, "det_score": det_score, "flip": flip},
        "crop_size": CROP_SIZE,
        "input_size": size or CROP_SIZE,
        "images_extracted": int(extracted),
        "cache": str(cache) if cache else None,
        "tar_at_far": res["tar_at_far"],
        "roc": res["roc"],
    }
    if one_to_n:
        out["one_to_n"] = identify(meta.root, prefix, tids, tfeats)
    return out
