"""Routing clusters (CondFace, thesis ch. 5, Table 5.1): do a model's routing vectors group faces by attribute?

* :func:`collect_vectors`: one vector per image of a store -- a CondFace model's ``internals["routing"]``
  (B, D), or, for a model without routing (the thesis's BL row), the global average pool of its last
  three named stages (``model.layer_names`` up to ``cam_layer``) concatenated: 128 + 256 + 512 = 896
  entries for an IR-18 of width 64, the same for any model that names its stages (IR-ResNet, ResNet,
  MobileFaceNet).
* :func:`kmeans`: offline k-means with a fixed seed (k-means++ start, Lloyd iterations; ``spherical``
  clusters L2-normalised vectors by cosine, as DeepCluster-v2; empty clusters keep their centroid).
* :func:`own_assignments`: a model trained with clustering (``train condface --clustering``) also
  assigns each vector to its own classifier: ``heads.pt`` beside the checkpoint holds the Sinkhorn
  ``prototypes`` ``{"weight": (P, D')}`` or the k-means ``centroids`` ``{"centroids": (P, D'), ...}``
  and, optionally, the ``cluster_head`` (meta ``cluster_head``: identity, linear or mlp) that maps beta
  to D'; assignment = argmax of the cosines (the scores both methods train with).
* :func:`store_targets`: the targets each clustering is scored against -- the thesis's cohort code
  (age x gender x race x pitch bin x yaw bin, :mod:`facetool.eval.clusters`) over the parts the store
  has (a store without pose uses age x gender x race, and says so) and each part alone.
* :func:`dissect_routing`: all of it for a model (and a ``compare`` model), scored with
  :func:`facetool.eval.clusters.cluster_scores` (purity, sklearn's AMI with the 'arithmetic' average),
  written as ``routing.csv`` / ``routing.json``, ``tsne_<model>.png`` (coloured by each attribute) and
  ``clusters_<model>.png`` (each largest cluster's faces with its majority cohort).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError
from facetool.eval.clusters import COHORT_PARTS, cluster_scores, cohort_parts
from facetool.hooks import eval_mode, taps
from facetool.io import atomic_path, torch_load, write_json, write_text
from facetool.store import UNKNOWN, FaceStore

DEFAULT_CLUSTERS = (30, 300, 1000)  # Table 5.1's cluster counts
TSNE_MAX = 2000  # images in a t-SNE plot (a fixed sample; t-SNE is quadratic)
GRID_CLUSTERS, GRID_IMAGES = 8, 8  # largest clusters shown, faces per cluster
#: CelebA's binary attributes standing in for a missing cohort attribute (no -> 0, yes -> 1)
_STAND_INS = {"gender": ("Male", {"no": "female", "yes": "male"})}


def parse_clusters(text: str | Sequence[int], images: int | None = None, option: str = "--clusters") -> list[int]:
    """``"30,300,1000"`` -> [30, 300, 1000]: integers >= 2 and, given ``images``, at most that many."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(v) for v in text]
    try:
        ks = [int(p) for p in parts if p]
    except ValueError:
        raise FacetoolError(f"{option} must be a comma list of cluster counts, e.g. 30,300,1000, got {text!r}") from None
    if not ks:
        raise FacetoolError(f"{option} must name at least one cluster count, e.g. 30,300,1000")
    for k in ks:
        if k < 2:
            raise FacetoolError(f"{option}: each cluster count must be >= 2, got {k}")
        if images is not None and k > images:
            raise FacetoolError(f"{option}: {k} clusters is more than the {images} images clustered; "
                                f"use counts up to {images} (or a larger --split or --max-images)")
    return list(dict.fromkeys(ks))


def has_routing(model: Any) -> bool:
    return "routing" in getattr(model, "internal_names", ())


def bl_stages(model: Any) -> list[str]:
    """The last three named stages up to the model's last spatial one (``cam_layer``): the BL features."""
    names = list(getattr(model, "layer_names", ()))
    cam = getattr(model, "cam_layer", "")
    if cam in names:
        names = names[: names.index(cam) + 1]
    if len(names) < 3:
        label = getattr(model, "name", type(model).__name__)
        raise FacetoolError(f"model {label} has no routing vectors and names fewer than three stages "
                            f"({', '.join(names) or 'none'}); dissect routing needs a CondFace model or one whose "
                            "stages it can pool (IR-ResNet, ResNet, MobileFaceNet)")
    return names[-3:]


@torch.no_grad()
def model_vectors(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D) vectors of normalised images ``x``: the routing vectors, or the BL features (GAP of the last
    three stages, concatenated). Reads the model through its interface; leaves it as it was."""
    with eval_mode(model):
        if has_routing(model):
            _, internals = model(x, return_internals=True)
            return internals["routing"].float()
        names = bl_stages(model)
        with taps(model, names, detach=True, first=True) as found:
            model(x)
        outs = []
        for n in names:
            t = found[n].float()
            outs.append(t.mean(dim=(2, 3)) if t.dim() == 4 else t.flatten(1))
        return torch.cat(outs, 1)


def sample_rows(store: str | Path, split: str, max_images: int | None, seed: int = 0) -> np.ndarray:
    """The store rows of ``split`` (train, test, all), or a fixed sorted sample of ``max_images`` of them."""
    with FaceStore(store) as s:
        rows = np.asarray(s.indices(None if split == "all" else split), np.int64)
    if not len(rows):
        raise FacetoolError(f"split {split!r} of {Path(store).name} has no images")
    if max_images is not None and max_images < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    return rows


@torch.no_grad()
def collect_vectors(model: nn.Module, store: str | Path, rows: np.ndarray, *, batch_size: int = 64,
                    device: str | None = None) -> np.ndarray:
    """(N, D) float32 vectors (:func:`model_vectors`) of the store ``rows``, at the model's input size."""
    from facetool.data import make_loader, open_dataset
    from facetool.devices import resolve_device
    from facetool.models.features import input_size_of

    if not isinstance(model, nn.Module):
        raise FacetoolError("dissect routing needs a PyTorch model (an ONNX file has no routing vectors or stages)")
    with FaceStore(store) as s:
        size = s.image_size[0]
    insize = input_size_of(model) or size
    ds = open_dataset(store, None, size=insize if insize != size else None, indices=rows)
    dev = torch.device(resolve_device(device))
    model.to(dev)
    out = [model_vectors(model, b["image"].to(dev)).cpu() for b in make_loader(ds, batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def kmeans(x: Any, k: int, *, seed: int = 0, spherical: bool = True, iterations: int = 30,
           device: str | None = None) -> np.ndarray:
    """Cluster labels (N,) of the rows of ``x`` into ``k`` clusters: k-means++ start from ``seed``, then
    Lloyd iterations (at most ``iterations``, until no label changes). ``spherical``: rows L2-normalised,
    assigned by cosine, centroids the normalised means. Empty clusters keep their centroid."""
    v = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device or "cpu")
    n = v.shape[0]
    if not 2 <= k <= n:
        raise FacetoolError(f"k-means needs 2 <= clusters <= {n} samples, got {k}")
    if spherical:
        v = F.normalize(v, dim=1)
    gen = torch.Generator().manual_seed(int(seed))

    def dist(c: torch.Tensor) -> torch.Tensor:  # (N, K) squared distances (spherical: 2 - 2 cos)
        if spherical:
            return (2.0 - 2.0 * v @ c.t()).clamp_min(0)
        return (v.pow(2).sum(1, keepdim=True) - 2.0 * v @ c.t() + c.pow(2).sum(1)).clamp_min(0)

    first = int(torch.randint(n, (1,), generator=gen))
    centres = [first]
    d2 = dist(v[first : first + 1])[:, 0]
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to d^2
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial((d2 / total).cpu().double(), 1, generator=gen))
        else:  # every row sits on a centre already (duplicates): any row not chosen yet
            free = np.setdiff1d(np.arange(n), centres)
            nxt = int(free[int(torch.randint(len(free), (1,), generator=gen))])
        centres.append(nxt)
        d2 = torch.minimum(d2, dist(v[nxt : nxt + 1])[:, 0])
    c = v[centres].clone()
    labels = None
    for _ in range(iterations):
        new = dist(c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, v)
        counts = torch.bincount(labels, minlength=k).to(v.dtype)
        full = counts > 0
        c[full] = sums[full] / counts[full, None]
        if spherical:
            c[full] = F.normalize(c[full], dim=1)
    return labels.cpu().numpy().astype(np.int64)


def own_assignments(model_path: str | Path, model: nn.Module, vectors: np.ndarray,
                    notes: list[str] | None = None) -> tuple[str, np.ndarray] | None:
    """``(label, assignments)`` of a model trained with clustering to its own classifier (``heads.pt``
    beside the checkpoint, read as the module docstring says), or None for a model trained without one
    (or whose k-means centroids were never fitted: all zero after a first epoch; said in ``notes``).
    A model whose meta names a clustering but whose heads file is missing or has no prototypes is a
    one-line error (the row would be silently missing otherwise)."""
    meta = getattr(model, "meta", {}) or {}
    clustering = meta.get("clustering")
    if not clustering or clustering == "none":
        return None
    heads_path = Path(model_path).parent / "heads.pt"
    if not heads_path.is_file():
        raise FacetoolError(f"{model_path} was trained with --clustering {clustering} but {heads_path} (its "
                            "classifier) is missing")
    heads = torch_load(heads_path, "heads file")
    key = next((k for k in ("prototypes", "centroids") if isinstance(heads, dict) and k in heads), None)
    sd = heads[key] if key and isinstance(heads[key], dict) else {}
    weight = sd.get("weight", sd.get("centroids"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise FacetoolError(f"{heads_path} has no prototypes/centroids (P, D); found: "
                            f"{', '.join(map(str, heads)) if isinstance(heads, dict) else type(heads).__name__}")
    if not bool(weight.abs().sum() > 0):
        if notes is not None:
            notes.append(f"{model_path}: its {clustering} {key} were never fitted (all zero), no own-classifier row")
        return None
    v = torch.as_tensor(vectors, dtype=torch.float32)
    head: nn.Module = nn.Identity()
    kind = meta.get("cluster_head")
    if isinstance(heads.get("cluster_head"), dict) and heads["cluster_head"] and kind and kind != "identity":
        from facetool.trainers.condface import cluster_head

        head = cluster_head(kind, v.shape[1])
        try:
            head.load_state_dict(heads["cluster_head"])
        except RuntimeError as e:
            raise FacetoolError(f"{heads_path}: its cluster_head does not fit a {kind} head on "
                                f"{v.shape[1]}-d routing vectors ({str(e).splitlines()[0]})") from None
    with torch.no_grad(), eval_mode(head):
        z = F.normalize(head(v), dim=1)
        if z.shape[1] != weight.shape[1]:
            raise FacetoolError(f"{heads_path}: {key} are {weight.shape[1]}-d but the cluster head gives "
                                f"{z.shape[1]}-d vectors")
        scores = z @ F.normalize(weight.float(), dim=1).t()
    return f"{clustering}, P={weight.shape[0]}", scores.argmax(1).numpy().astype(np.int64)


def _codes_of(store: FaceStore, name: str) -> tuple[np.ndarray, list[str]]:
    codes, vocab = store.attribute(name)
    return np.asarray(codes, np.int64), list(vocab)


def store_targets(store: str | Path, rows: np.ndarray) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``(targets, used, notes)`` for the store ``rows``: ``targets["cohort"]`` is the cohort code over the
    parts present (mixed radix in ``COHORT_PARTS`` order, -1 where a used part is unknown) and
    ``targets[part]`` each used part's digit alone; ``used`` names the parts; ``notes`` says what is
    missing or stood in (CelebA's ``Male`` for gender)."""
    notes: list[str] = []
    with FaceStore(store) as s:
        have = set(s.attribute_names("image")) | set(s.attribute_names("identity"))
        n = len(s.labels)
        arrays: dict[str, Any] = {}
        vocab: dict[str, list[str]] = {}
        for part, name in (("age", "age"), ("gender", "gender"),
                           ("race", "race" if "race" in have else "group" if "group" in have else None)):
            if name is None or name not in have:
                stand = _STAND_INS.get(part)
                if stand and stand[0] in have:
                    codes, voc = _codes_of(s, stand[0])
                    arrays[part], vocab[part] = codes, [stand[1].get(v.lower(), "unknown") for v in voc]
                    notes.append(f"{part} from the store's {stand[0]!r} attribute")
                continue
            key = "group" if name == "group" else part
            arrays[key], vocab[key] = _codes_of(s, name)
            if name == "group":
                notes.append("race from the synthetic 'group' (face-shape families A/B/C)")
        metas = set(s.f["meta"].keys()) if "meta" in s.f else set()
        if "pose" in metas:
            pose = s.meta("pose")
            prep = s.metadata.get("preprocessing")
            cols = list((prep.get("pose") if isinstance(prep, dict) else None) or ["yaw", "pitch", "roll"])
            if pose.ndim == 2 and "yaw" in cols and "pitch" in cols and pose.shape[1] >= len(cols):
                arrays["yaw"], arrays["pitch"] = pose[:, cols.index("yaw")], pose[:, cols.index("pitch")]
        elif {"yaw", "pitch"} <= metas:
            arrays["yaw"], arrays["pitch"] = s.meta("yaw").reshape(-1), s.meta("pitch").reshape(-1)
    present = {"age": "age" in arrays, "gender": "gender" in arrays, "race": "race" in arrays or "group" in arrays,
               "pitch": "pitch" in arrays, "yaw": "yaw" in arrays}
    used = [p for p in COHORT_PARTS if present[p]]
    if not used:
        raise FacetoolError(f"store {Path(store).name} has none of the cohort code's parts (age, gender, race or "
                            f"group, pose); add attributes with `facetool annotate`")
    missing = [p for p in COHORT_PARTS if not present[p]]
    if missing:
        notes.append(f"the store has no {', '.join(missing)}: the cohort code is {' x '.join(used)}")
    # the parts through the one cohort-code implementation; absent parts are all-unknown placeholders
    unknown_attr = np.full(n, UNKNOWN, np.int64)
    full = {"age": arrays.get("age", unknown_attr), "gender": arrays.get("gender", unknown_attr),
            "yaw": arrays.get("yaw", np.full(n, np.nan)), "pitch": arrays.get("pitch", np.full(n, np.nan))}
    if "group" in arrays:
        full["group"] = arrays["group"]
    else:
        full["race"] = arrays.get("race", unknown_attr)
    voc = {k: vocab.get(k, ["unknown"]) for k in ("age", "gender", "race", "group")}
    digits = cohort_parts(**full, vocab=voc)
    code = np.zeros(len(rows), np.int64)
    known = np.ones(len(rows), bool)
    targets: dict[str, np.ndarray] = {}
    for p in used:
        d = digits[p][rows]
        targets[p] = d
        code = code * COHORT_PARTS[p] + np.maximum(d, 0)
        known &= d >= 0
    targets = {"cohort": np.where(known, code, UNKNOWN), **targets}
    return targets, used, notes


def cohort_label(code: int, used: Sequence[str]) -> str:
    """The digits of a cohort code over the ``used`` parts ('10422' for the full code), '-' for unknown."""
    if code < 0:
        return "-"
    out = []
    for p in reversed(list(used)):
        code, d = divmod(int(code), COHORT_PARTS[p])
        out.append(str(d))
    return "".join(reversed(out))


def score_clustering(labels: np.ndarray, targets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per target: purity, AMI, NMI (:func:`facetool.eval.clusters.cluster_scores`) and the images scored
    (those with a known target); a target no image knows gets NaN scores."""
    out = {}
    for name, t in targets.items():
        known = int((t >= 0).sum())
        if known == 0:
            out[name] = {"purity": float("nan"), "ami": float("nan"), "nmi": float("nan"), "images": 0}
            continue
        out[name] = {**cluster_scores(t, labels), "images": known}
    return out


# -- plots ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def tsne_points(vectors: np.ndarray, seed: int = 0, limit: int = TSNE_MAX) -> tuple[np.ndarray, np.ndarray]:
    """``(sample, xy)``: a fixed sample of at most ``limit`` row indices and their 2-D t-SNE positions."""
    from sklearn.manifold import TSNE

    n = len(vectors)
    sample = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    x = vectors[sample].astype(np.float64)
    if len(sample) < 4:
        return sample, np.zeros((len(sample), 2))
    perplexity = float(min(30.0, (len(sample) - 1) / 3.0))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return sample, xy


def plot_tsne(xy: np.ndarray, colours: dict[str, np.ndarray], path: Path, title: str,
              levels: dict[str, int] | None = None) -> Path:
    """One panel per target, points coloured by its value on a fixed scale of ``levels[target]`` values
    (grey = unknown)."""
    plt = _plt()
    names = list(colours)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = colours[name]
        unknown = c < 0
        if unknown.any():
            ax.scatter(xy[unknown, 0], xy[unknown, 1], s=4, c="lightgrey")
        top = max(1, (levels or {}).get(name, int(c.max()) + 1 if len(c) else 1) - 1)
        ax.scatter(xy[~unknown, 0], xy[~unknown, 1], s=4, c=c[~unknown], vmin=0, vmax=top,
                   cmap="tab10" if name != "cohort" else "nipy_spectral")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return _savefig(fig, path)


def plot_cluster_grid(store: str | Path, rows: np.ndarray, labels: np.ndarray, cohort: np.ndarray,
                      used: Sequence[str], path: Path, title: str) -> tuple[Path, list[dict]]:
    """Faces of the ``GRID_CLUSTERS`` largest clusters (``GRID_IMAGES`` each, in store order), each row
    titled with its size and majority cohort; returns the path and one record per shown cluster."""
    plt = _plt()
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:GRID_CLUSTERS]
    recs = []
    fig, axes = plt.subplots(len(order), GRID_IMAGES, figsize=(1.1 * GRID_IMAGES, 1.25 * len(order)), squeeze=False,
                             constrained_layout=True)
    with FaceStore(store) as s:
        for r, k in enumerate(order):
            members = np.flatnonzero(labels == k)
            codes = cohort[members]
            kn = codes[codes >= 0]
            if len(kn):
                vals, cnt = np.unique(kn, return_counts=True)
                maj, share = int(vals[cnt.argmax()]), float(cnt.max() / len(kn))
            else:
                maj, share = UNKNOWN, float("nan")
            recs.append({"cluster": int(k), "images": int(len(members)), "majority_cohort": cohort_label(maj, used),
                         "majority_share": share})
            shown = members[:GRID_IMAGES]
            imgs = s.images(rows[shown]) if len(shown) else []
            for c in range(GRID_IMAGES):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(shown):
                    ax.imshow(imgs[c])
            axes[r][0].set_title(f"cluster {k}: {len(members)} images, majority {cohort_label(maj, used)} "
                                 f"({100 * share:.0f} %)" if len(kn) else f"cluster {k}: {len(members)} images",
                                 fontsize=7, loc="left")
    fig.suptitle(f"{title} (cohort digits: {' '.join(used)})", fontsize=9)
    return _savefig(fig, path), recs


# -- the whole dissection ------------------------------------------------------------------------
def _names(paths: Sequence[Path]) -> list[str]:
    from facetool.io import run_name

    names = [run_name(p) for p in paths]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def dissect_routing(
    model_path: str | Path,
    store: str | Path,
    out: str | Path,
    *,
    clusters: str | Sequence[int] = DEFAULT_CLUSTERS,
    compare: str | Path | None = None,
    split: str = "test",
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    spherical: bool = True,
    device: str | None = None,
    arch: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Cluster the vectors (:func:`collect_vectors`) of ``model_path`` (and ``compare``) over ``split`` of
    ``store`` with k-means at each count of ``clusters`` (and, for a model trained with clustering, its
    own classifier), score them against the cohort code and each of its parts, and write ``routing.csv``,
    ``routing.json``, ``tsne_<name>.png`` and ``clusters_<name>.png`` to ``out``. Returns the summary
    (``rows``: one record per model x clustering with ``<target>_purity`` / ``<target>_ami`` in %)."""
    from facetool.data.sources import face_source
    from facetool.models import load_model
    from facetool.models.features import is_landmark_model, landmark_refusal

    store = face_source(store)
    rows = sample_rows(store, split, max_images, seed)
    ks = parse_clusters(clusters, len(rows))  # before any model runs
    targets, used, notes = store_targets(store, rows)
    paths = [Path(model_path)] + ([Path(compare)] if compare is not None else [])
    names = _names(paths)
    models = [load_model(p, name=arch if i == 0 else None, option="--arch") for i, p in enumerate(paths)]
    for p, m in zip(paths, models):  # every model is usable before the first one runs
        if not isinstance(m, nn.Module):
            raise FacetoolError(f"{p}: dissect routing needs a PyTorch model (an ONNX file has no routing vectors "
                                "or stages)")
        if is_landmark_model(m):
            raise landmark_refusal(m, "--model" if p == paths[0] else "--compare")
        if not has_routing(m):
            bl_stages(m)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    summary: dict[str, Any] = {"store": str(store), "split": split, "images": int(len(rows)), "clusters": ks,
                               "kmeans": "spherical" if spherical else "plain", "seed": seed, "cohort_parts": used,
                               "notes": notes, "models": {}, "rows": records}
    files: list[str] = []
    for p, name, model in zip(paths, names, models):
        if progress:
            progress(f"collecting vectors of {name}")
        vec = collect_vectors(model, store, rows, batch_size=batch_size, device=device)
        kind = "routing" if has_routing(model) else "stages " + "+".join(bl_stages(model))
        summary["models"][name] = {"path": str(p), "vectors": kind, "dim": int(vec.shape[1])}
        clusterings: list[tuple[str, np.ndarray]] = []
        for k in ks:
            if progress:
                progress(f"k-means {k} of {name}")
            clusterings.append((f"k-means {k}", kmeans(vec, k, seed=seed, spherical=spherical)))
        own = own_assignments(p, model, vec, notes) if has_routing(model) else None
        if own is not None:
            clusterings.append((f"own ({own[0]})", own[1]))
        for method, labels in clusterings:
            sc = score_clustering(labels, targets)
            rec: dict[str, Any] = {"model": name, "clustering": method, "clusters": int(len(np.unique(labels)))}
            for t, v in sc.items():
                rec[f"{t}_purity"], rec[f"{t}_ami"] = 100 * v["purity"], 100 * v["ami"]
            rec["scores"] = sc
            records.append(rec)
        # plots: t-SNE coloured by each target; the largest clusters of the first clustering
        if progress:
            progress(f"t-SNE of {name}")
        sample, xy = tsne_points(vec, seed)
        tsne_file = f"tsne_{name}.png"
        plot_tsne(xy, {t: v[sample] for t, v in targets.items()}, out / tsne_file,
                  f"{name}: {kind} ({len(sample)} images)",
                  {"cohort": int(np.prod([COHORT_PARTS[u] for u in used])), **{u: COHORT_PARTS[u] for u in used}})
        grid_file = f"clusters_{name}.png"
        _, shown = plot_cluster_grid(store, rows, clusterings[0][1], targets["cohort"], used, out / grid_file,
                                     f"{name}, {clusterings[0][0]}: largest clusters")
        summary["models"][name]["largest_clusters"] = {"clustering": clusterings[0][0], "clusters": shown}
        files += [tsne_file, grid_file]
    cols = ["model", "clustering", "clusters"] + [f"{t}_{m}" for t in targets for m in ("purity", "ami")]
    import pandas as pd

    write_text(out / "routing.csv", pd.DataFrame([{c: r[c] for c in cols} for r in records]).to_csv(
        index=False, float_format="%.4f"))
    summary["targets"] = list(targets)
    summary["files"] = ["routing.csv", "routing.json", *files]
    write_json(out / "routing.json", summary)
    return summary


__all__ = ["DEFAULT_CLUSTERS", "bl_stages", "cohort_label", "collect_vectors", "dissect_routing", "has_routing",
           "kmeans", "model_vectors", "own_assignments", "parse_clusters", "sample_rows", "score_clustering",
           "store_targets"]
