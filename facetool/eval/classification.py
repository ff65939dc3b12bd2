"""Closed-set identity classification on a face store (ConvNet-IIG Table II).

:func:`predict` runs a model over a split once (batched, eval mode, no grad) and keeps what the
tables and dissections need: the top-k classes and the executed gate pattern per image.
:func:`evaluate_classifier` turns that into top-1/top-5, executed GFLOPs per image (from the
gate decisions actually taken on the evaluated images), dense GFLOPs, parameters and the mean
gate execution rate, over all gated blocks (``gate_rate``) and over the *free* blocks
(``gate_rate_free``): the blocks whose training target was below 1, i.e. the ones ``--target`` sets
(the first and last blocks are pinned to 1). The targets come from the checkpoint meta that
``train aig``/``train iig --with-target`` record; without them the free rate is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from facetool.errors import FacetoolError
from facetool.store import FaceStore
from facetool.tasks import task_of


@dataclass
class Predictions:
    """Per-image results of one pass over a split (rows in store order of ``indices``)."""

    indices: np.ndarray  # (N,) store rows
    labels: np.ndarray  # (N,) true identity
    topk: np.ndarray  # (N, k) predicted identities, best first
    gates: np.ndarray | None  # (N, L) uint8 executed gates, None for non-gated models
    attr_pred: np.ndarray | None = None  # (N, A) predicted codes per attribute head (attribute tasks)
    attr_true: np.ndarray | None = None  # (N, A) store codes (-1 unknown)

    @property
    def correct(self) -> np.ndarray:
        return self.topk[:, 0] == self.labels

    def topk_accuracy(self, k: int) -> float:
        if not len(self.labels):
            return float("nan")
        return float((self.topk[:, :k] == self.labels[:, None]).any(1).mean())


def model_input_size(model: torch.nn.Module, store_size: int) -> int:
    """The input size recorded in the model's config, else the store's (a ResNet takes any size >= 32;
    an embedding protocol uses :func:`facetool.models.features.input_size_of` instead)."""
    return int(getattr(model, "config", {}).get("input_size") or store_size)


def free_blocks(meta: dict | None, num_gates: int) -> tuple[list[int], float] | None:
    """(indices, mean target) of the gated blocks trained with a target below 1, from the targets
    that AIG/IIG training stores in the checkpoint meta (``{"aig": {"targets": [...]}}`` or
    ``{"iig": {...}}``); ``None`` when the meta has no targets for ``num_gates`` blocks or none is free."""
    for key in ("aig", "iig"):
        targets = ((meta or {}).get(key) or {}).get("targets")
        if targets is not None and len(targets) == num_gates:
            free = [i for i, t in enumerate(targets) if float(t) < 1.0]
            if free:
                return free, float(np.mean([float(targets[i]) for i in free]))
    return None


def check_classifier(model: torch.nn.Module, num_classes: int, source: str | Path = "") -> None:
    """Refuse embedding models and classifiers trained on another number of identities."""
    if getattr(model, "output_kind", "classification") != "classification":
        raise FacetoolError(f"model {source} is an embedding model; classification needs a classifier "
                             "(verify an embedding model with eval lfw|ijbb|ijbc)")
    if not task_of(model).is_identity:
        return
    n = getattr(model, "config", {}).get("num_classes")
    if n is not None and int(n) != num_classes:
        raise FacetoolError(f"model {source} has {n} classes but the store has {num_classes} identities")


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    store: str | Path,
    split: str = "test",
    batch_size: int = 64,
    *,
    topk: int = 5,
    workers: int = 0,
    device: str | None = None,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Predictions:
    """One pass of ``model`` (eval mode) over ``split`` of ``store``; ``on_batch(n)`` reports progress."""
    from facetool.data import face_source, make_loader, open_dataset

    with FaceStore(face_source(store)) as s:
        size = s.image_size[0]
        ncls = s.num_classes
    check_classifier(model, ncls, getattr(model, "config", {}).get("name", ""))
    task = task_of(model)
    insize = model_input_size(model, size)
    attrs = () if task.is_identity else task.names
    ds = open_dataset(store, split, size=insize if insize != size else None, indices=indices, attributes=attrs)
    if not task.is_identity:
        _check_vocab(task, ds.attr_values, store)
    if not len(ds):
        raise FacetoolError(f"split {split!r} of {store} has no images")
    from facetool.devices import resolve_device

    dev = torch.device(resolve_device(device))
    model.eval().to(dev)
    idx, labels, tops, gates, apred, atrue = [], [], [], [], [], []
    for batch in make_loader(ds, batch_size, workers=workers):
        x = batch["image"].to(dev, non_blocking=True)
        out, internals = model(x, return_internals=True)
        if not task.is_identity:
            from facetool.tasks import split_logits

            apred.append(torch.stack([p.argmax(1) for p in split_logits(out.float(), task)], 1).cpu().numpy())
            atrue.append(batch["attrs"].numpy())
            idx.append(batch["index"].numpy())
            labels.append(batch["label"].numpy())
            tops.append(np.zeros((len(x), 0), np.int64))
            if on_batch:
                on_batch(len(x))
            continue
        if out.shape[1] != ncls:
            raise FacetoolError(f"model outputs {out.shape[1]} classes but the store has {ncls} identities")
        k = min(topk, out.shape[1])
        tops.append(out.float().topk(k, dim=1).indices.cpu().numpy())
        idx.append(batch["index"].numpy())
        labels.append(batch["label"].numpy())
        g = (internals or {}).get("gates")
        if g is not None:
            gates.append((g.detach() > 0.5).to(torch.uint8).cpu().numpy())
        if on_batch:
            on_batch(len(x))
    return Predictions(np.concatenate(idx), np.concatenate(labels), np.concatenate(tops),
                       np.concatenate(gates) if gates else None,
                       np.concatenate(apred) if apred else None, np.concatenate(atrue) if atrue else None)


def _check_vocab(task, store_vocab: dict, store) -> None:
    for name, vocab in zip(task.names, task.vocab):
        if list(store_vocab[name]) != list(vocab):
            raise FacetoolError(f"attribute {name!r} of {store} has values {', '.join(store_vocab[name])} but the model "
                                f"was trained on {', '.join(vocab)}")


def majority_baselines(store: str | Path, task, split: str, labels: np.ndarray | None = None,
                       codes: np.ndarray | None = None) -> dict[str, dict]:
    """Per head: the training split's majority value, its training share, and the accuracy of always
    predicting it on the evaluated images (``labels`` for identity tasks, ``codes`` (N, A) otherwise)."""
    from facetool.tasks import class_stats

    stats = class_stats(store, task, "train")
    out = {}
    for i, name in enumerate(task.names):
        st = stats[name]
        t = labels if task.is_identity else codes[:, i]
        known = t >= 0
        out[name] = {"majority": st["majority"], "train_share": st["majority_share"],
                     "baseline": float((t[known] == st["majority_code"]).mean()) if known.any() else float("nan"),
                     "known": int(known.sum()), "counts": st["counts"]}
    return out


def evaluate_classifier(
    model: torch.nn.Module,
    store: str | Path,
    split: str = "test",
    batch_size: int = 64,
    *,
    workers: int = 0,
    device: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Top-1/top-5 (%), executed and dense GFLOPs per image, parameters (M) and mean gate execution
    rate of ``model`` on ``split`` of ``store`` (all gated blocks, and the free blocks with their mean
    training target: :func:`free_blocks`). Executed FLOPs come from the gate decisions the
    model took on these images (the dense count for models without gates)."""
    from facetool.flops import count_flops, count_params, executed_flops

    pred = predict(model, store, split, batch_size, workers=workers, device=device, on_batch=on_batch)
    with FaceStore(store) as s:
        size = model_input_size(model, s.image_size[0])
    cpu_model = model.cpu()
    dense = float(count_flops(cpu_model, size))
    task = task_of(model)
    base = majority_baselines(store, task, split, pred.labels, pred.attr_true)
    res = {
        "model": getattr(model, "config", {}).get("name", type(model).__name__),
        "split": split,
        "task": task.describe(),
        "images": int(len(pred.labels)),
        "top1": 100.0 * pred.topk_accuracy(1) if task.is_identity else None,
        "top5": 100.0 * pred.topk_accuracy(5) if task.is_identity else None,
        "attr_acc": None,
        "majority": 100.0 * base["identity"]["baseline"] if task.is_identity else None,
        "gflops_dense": dense / 1e9,
        "gflops_executed": dense / 1e9,
        "params_m": count_params(model) / 1e6,
        "gate_rate": None,
        "gate_rate_free": None,
        "target_free": None,
    }
    if pred.gates is not None and pred.gates.size:
        g = torch.as_tensor(pred.gates, dtype=torch.float32)
        res["gflops_executed"] = float(executed_flops(cpu_model, g, size).double().mean()) / 1e9
        res["gate_rate"] = float(pred.gates.mean())
        res["gate_rate_per_block"] = pred.gates.mean(0).round(4).tolist()
        free = free_blocks(getattr(model, "meta", None), pred.gates.shape[1])
        if free is not None:
            res["gate_rate_free"] = float(pred.gates[:, free[0]].mean())
            res["target_free"] = free[1]
    res["flops_ratio"] = res["gflops_executed"] / res["gflops_dense"] if dense else None
    if not task.is_identity:
        per = {}
        for i, name in enumerate(task.names):
            t, p = pred.attr_true[:, i], pred.attr_pred[:, i]
            known = t >= 0
            per[name] = {"acc": 100.0 * float((p[known] == t[known]).mean()) if known.any() else float("nan"),
                         "majority": 100.0 * base[name]["baseline"], "majority_value": base[name]["majority"],
                         "train_majority_share": 100.0 * base[name]["train_share"], "known": base[name]["known"]}
        res["attributes"] = per
        res["attr_acc"] = float(np.nanmean([v["acc"] for v in per.values()]))
        res["majority"] = float(np.nanmean([v["majority"] for v in per.values()]))
    return res


def compare_classifiers(
    model_paths: Sequence[str | Path],
    store: str | Path,
    split: str = "test",
    batch_size: int = 64,
    *,
    workers: int = 0,
    device: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    archs: Sequence[str | None] | None = None,
) -> list[dict]:
    """One :func:`evaluate_classifier` row per checkpoint (Table II: models side by side).

    ``archs``: the architecture of each file that does not record one (one per model, in order)."""
    from facetool.models import load_model

    if not model_paths:
        raise FacetoolError("give at least one --model")
    archs = list(archs or [None] * len(model_paths))
    if len(archs) != len(model_paths):
        raise FacetoolError(f"give --arch once per --model, in the same order ({len(model_paths)} models, "
                            f"{len(archs)} --arch), or not at all")
    from facetool.data import face_source

    FaceStore(face_source(store)).close()
    models = [(Path(p), load_model(p, name=a)) for p, a in zip(model_paths, archs)]  # fail before any work
    rows = []
    for p, m in models:
        r = evaluate_classifier(m, store, split, batch_size, workers=workers, device=device, on_batch=on_batch)
        rows.append({"checkpoint": str(p), **r})
    return rows
