"""Dissection of gated networks (ConvNet-AIG / ConvNet-IIG, ConvNet-IIG Fig. 1-5).

Gate dissection looks at which gated blocks each image executes:

* :func:`gate_fractions_by_attribute` - fraction of images of each attribute value that execute
  each gate (heatmap, Fig. 2-4);
* :func:`active_gate_stats` - number of active gates for correctly vs wrongly classified images
  (Fig. 5);
* :func:`easy_hard_images` - per identity, the images executing the fewest ("easy") and the most
  ("hard") gates;
* :func:`training_curves` - top-1/top-5 curves of a run's ``metrics.csv`` (Fig. 1).

:func:`dissect_gates` runs a model over a store once and writes all of it to a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from facetool.errors import FacetoolError, require_dir, require_file
from facetool.io import atomic_path, write_json, write_text
from facetool.data.sources import face_source
from facetool.store import UNKNOWN, FaceStore


def gate_fractions_by_attribute(gates: np.ndarray, codes: np.ndarray, values: Sequence[str]) -> pd.DataFrame:
    """Rows = attribute values, columns ``images`` and ``block_<j>``: the fraction of that value's
    images (unknown codes excluded) whose gate j was open."""
    gates = np.asarray(gates, np.float64)
    codes = np.asarray(codes)
    L = gates.shape[1]
    rows = []
    for c, v in enumerate(values):
        m = codes == c
        frac = gates[m].mean(0) if m.any() else np.full(L, np.nan)
        rows.append({"value": v, "images": int(m.sum()), **{f"block_{j}": float(frac[j]) for j in range(L)}})
    return pd.DataFrame(rows).set_index("value")


def active_gate_stats(gates: np.ndarray, correct: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean/std/min/max number of active gates per image for correct, wrong and all predictions."""
    active = np.asarray(gates).sum(1).astype(np.float64)
    correct = np.asarray(correct, bool)
    out = {}
    for name, m in (("correct", correct), ("wrong", ~correct), ("all", np.ones_like(correct))):
        a = active[m]
        out[name] = {"images": int(m.sum()),
                     "mean": float(a.mean()) if len(a) else float("nan"),
                     "std": float(a.std()) if len(a) else float("nan"),
                     "min": float(a.min()) if len(a) else float("nan"),
                     "max": float(a.max()) if len(a) else float("nan")}
    return out


def easy_hard_images(gates: np.ndarray, labels: np.ndarray, rows: np.ndarray, per_identity: int = 4,
                     identities: Sequence[int] | None = None) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """Per identity: ``easy`` = the ``per_identity`` images with the fewest active gates,
    ``hard`` = those with the most (at most half of the identity's images each, so they never
    overlap); each entry is (store row, active gates). Ties keep store order."""
    active = np.asarray(gates).sum(1)
    labels = np.asarray(labels)
    ids = identities if identities is not None else np.unique(labels)
    out = {}
    for k in ids:
        sel = np.flatnonzero(labels == k)
        if not len(sel):
            continue
        order = sel[np.argsort(active[sel], kind="stable")]
        n = min(per_identity, max(1, len(order) // 2))
        out[int(k)] = {"easy": [(int(rows[i]), int(active[i])) for i in order[:n]],
                       "hard": [(int(rows[i]), int(active[i])) for i in order[::-1][:n]]}
    return out


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """The epoch and every top-1/top-5 column of ``<run_dir>/metrics.csv``."""
    p = require_file(Path(require_dir(run_dir, "run folder")) / "metrics.csv", "metrics file")
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise FacetoolError(f"cannot read {p}: {str(e).splitlines()[0] if str(e) else 'empty'}") from None
    cols = [c for c in df.columns if "top1" in c.lower() or "top5" in c.lower() or "top_1" in c.lower()
            or "top_5" in c.lower()]
    if not cols:
        raise FacetoolError(f"{p} has no top-1/top-5 columns (columns: {', '.join(map(str, df.columns))})")
    x = "epoch" if "epoch" in df.columns else None
    out = df[[x, *cols]] if x else df[cols].assign(epoch=np.arange(1, len(df) + 1))[["epoch", *cols]]
    # one row per epoch (engines may log several rows per epoch: keep the last)
    return out.dropna(how="all", subset=cols).groupby("epoch", as_index=False).last()


# -- plotting ----------------------------------------------------------------------------------
def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fraction_heatmap(df: pd.DataFrame, path: Path, title: str) -> Path:
    plt = _plt()
    blocks = [c for c in df.columns if c.startswith("block_")]
    data = df[blocks].to_numpy(np.float64)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * len(blocks) + 2), 0.45 * len(df) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(df)), [f"{v} ({n})" for v, n in zip(df.index, df["images"])])
    ax.set_xticks(range(len(blocks)), [b.split("_")[1] for b in blocks], fontsize=7)
    ax.set_xlabel("gated block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of images executing the block")
    return _savefig(fig, path)


def plot_easy_hard_grid(store: FaceStore, picks: dict, identities: list[str], path: Path) -> Path:
    plt = _plt()
    ids = list(picks)
    n = max(len(picks[k]["easy"]) for k in ids)
    fig, axes = plt.subplots(len(ids), 2 * n, figsize=(1.3 * 2 * n, 1.45 * len(ids)), squeeze=False,
                             constrained_layout=True)
    for r, k in enumerate(ids):
        for c in range(2 * n):
            ax = axes[r][c]
            ax.axis("off")
            kind, j = ("easy", c) if c < n else ("hard", c - n)
            if j >= len(picks[k][kind]):
                continue
            row, active = picks[k][kind][j]
            ax.imshow(store.images([row])[0])
            ax.set_title(f"{kind} {active}", fontsize=7, color="green" if kind == "easy" else "red")
        axes[r][0].text(-0.1, 0.5, identities[k][:18], transform=axes[r][0].transAxes, ha="right",
                        va="center", fontsize=7)
    fig.suptitle("easy (fewest active gates) | hard (most active gates)", fontsize=9)
    return _savefig(fig, path)


def plot_active_hist(gates: np.ndarray, correct: np.ndarray, path: Path) -> Path:
    plt = _plt()
    active = np.asarray(gates).sum(1)
    bins = np.arange(active.min(), active.max() + 2) - 0.5
    fig, ax = plt.subplots(figsize=(5, 3))
    for m, name, col in ((correct, "correct", "tab:green"), (~correct, "wrong", "tab:red")):
        if m.any():
            ax.hist(active[m], bins=bins, alpha=0.6, density=True, label=f"{name} ({int(m.sum())})", color=col)
    ax.set_xlabel("active gates per image")
    ax.set_ylabel("density")
    ax.legend()
    return _savefig(fig, path)


def plot_curves(df: pd.DataFrame, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for c in df.columns:
        if c != "epoch":
            ax.plot(df["epoch"], df[c], marker="o", ms=3, label=c)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _savefig(fig, path)


# -- the whole dissection ------------------------------------------------------------------------
def dissect_gates(
    model_path: str | Path,
    store: str | Path,
    out: str | Path,
    *,
    attributes: Sequence[str] | None = None,
    split: str = "test",
    run: str | Path | None = None,
    batch_size: int = 64,
    identities: int = 8,
    per_identity: int = 4,
    device: str | None = None,
    arch: str | None = None,
) -> dict:
    """Run a gated model over ``split`` of ``store`` and write to ``out``: per attribute a heatmap
    PNG + CSV of gate execution fractions, ``easy_hard.png``, ``gate_stats.csv/json`` and
    ``active_gates.png`` (correct vs wrong), and ``curves.png/csv`` from ``run``'s metrics.csv.
    ``arch`` names the architecture of a bare state_dict no matcher recognises.
    Returns the summary that is also written to ``out/summary.json``."""
    from facetool.eval.classification import predict
    from facetool.models import load_model

    require_file(model_path, "model")
    with FaceStore(face_source(store)) as s:
        have = sorted(set(s.attribute_names("image")) | set(s.attribute_names("identity")))
        attrs = list(attributes) if attributes else have
        missing = [a for a in attrs if a not in have]
        if missing:
            raise FacetoolError(f"store {Path(store).name} has no attribute {', '.join(map(repr, missing))} "
                                f"(has: {', '.join(have) or 'none'}); add it with `facetool annotate`")
    curves = training_curves(run) if run is not None else None  # fail early on a bad run folder
    model = load_model(model_path, name=arch)
    pred = predict(model, store, split, batch_size, device=device)
    if pred.gates is None:
        raise FacetoolError(f"model {model_path} has no gates; dissect gates needs an AIG/IIG model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    summary: dict = {"model": str(model_path), "store": str(store), "split": split, "images": int(len(pred.labels)),
                     "blocks": int(pred.gates.shape[1]), "top1": 100 * pred.topk_accuracy(1),
                     "top5": 100 * pred.topk_accuracy(5), "gate_rate": float(pred.gates.mean()), "attributes": {}}
    with FaceStore(store) as s:
        for a in attrs:
            codes, values = s.attribute(a)
            df = gate_fractions_by_attribute(pred.gates, codes[pred.indices], values)
            write_text(out / f"gates_{a}.csv", df.to_csv(float_format="%.6g"))
            plot_fraction_heatmap(df, out / f"gates_{a}.png", f"gate execution by {a} ({split})")
            files += [f"gates_{a}.csv", f"gates_{a}.png"]
            blocks = df.filter(like="block_").to_numpy()
            spread = np.nanmax(blocks, 0) - np.nanmin(blocks, 0) if len(df) > 1 else np.zeros(blocks.shape[1])
            summary["attributes"][a] = {
                "images": {v: int(n) for v, n in df["images"].items()},
                "unknown": int((codes[pred.indices] == UNKNOWN).sum()),
                "max_spread": float(np.nan_to_num(spread).max()) if spread.size else 0.0,
                "most_selective_block": int(np.nan_to_num(spread).argmax()) if spread.size else -1,
            }
        # easy/hard: the identities with the most evaluated images
        ids, counts = np.unique(pred.labels, return_counts=True)
        chosen = ids[np.argsort(-counts, kind="stable")][:identities]
        picks = easy_hard_images(pred.gates, pred.labels, pred.indices, per_identity, sorted(chosen.tolist()))
        plot_easy_hard_grid(s, picks, s.identities, out / "easy_hard.png")
        files.append("easy_hard.png")
        write_json(out / "easy_hard.json", {s.identities[k]: v for k, v in picks.items()})
        files.append("easy_hard.json")
    stats = active_gate_stats(pred.gates, pred.correct)
    write_text(out / "gate_stats.csv", pd.DataFrame(stats).T.rename_axis("prediction").to_csv(float_format="%.6g"))
    write_json(out / "gate_stats.json", stats)
    plot_active_hist(pred.gates, pred.correct, out / "active_gates.png")
    files += ["gate_stats.csv", "gate_stats.json", "active_gates.png"]
    summary["active_gates"] = stats
    if curves is not None:
        write_text(out / "curves.csv", curves.to_csv(index=False, float_format="%.6g"))
        plot_curves(curves, out / "curves.png")
        files += ["curves.csv", "curves.png"]
        summary["curves"] = curves.iloc[-1].to_dict()
    summary["files"] = files + ["summary.json"]
    write_json(out / "summary.json", summary)
    return summary
