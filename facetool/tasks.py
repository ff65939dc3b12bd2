"""What a classifier predicts: identities, one categorical attribute, or all attributes at once.

A :class:`Task` is a small JSON-able description stored once, in the model's config
(``model.config["task"]``, saved with the checkpoint; written by :func:`record_task`, read by
:func:`task_of` and nothing else; CONTRACTS.md "Tasks")::

    {"kind": "identity" | "attribute" | "attributes",
     "names": [attribute names],            # ["identity"] for identity tasks
     "classes": [classes per attribute],    # [num identities] for identity tasks
     "vocab": [[value names per attribute]]}  # [] for identity tasks

Model outputs are always ONE plain tensor: (B, k) logits for identity and ``attribute:NAME``, and
(B, sum_i k_i) concatenated per-attribute logits for ``attributes`` (so zennit, ONNX export and DDP
see an ordinary classifier). :func:`split_logits` and :func:`task_slice` give the per-attribute parts.

Unknown attribute values (code -1) are ignored in the loss and in the accuracies. Every accuracy has
the majority-class baseline beside it: the most frequent value of the *training* split, scored on the
evaluated images (``base_<name>`` next to ``acc_<name>``, ``attr_base`` next to ``attr_acc``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facetool.errors import FacetoolError

KINDS = ("identity", "attribute", "attributes")
TASK_HELP = "identity | attribute:NAME | attributes (all attributes of the store) | attributes:A,B,..."


@dataclass
class Task:
    kind: str = "identity"
    names: list[str] = field(default_factory=lambda: ["identity"])
    classes: list[int] = field(default_factory=list)
    vocab: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FacetoolError(f"unknown task kind {self.kind!r}; use one of {', '.join(KINDS)}")
        self.names = [str(n) for n in self.names]
        self.classes = [int(k) for k in self.classes]
        self.vocab = [[str(v) for v in vs] for vs in self.vocab]
        if len(self.names) != len(self.classes):
            raise FacetoolError(f"task has {len(self.names)} names but {len(self.classes)} class counts")

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "classes": list(self.classes),
                "vocab": [list(v) for v in self.vocab]}

    @classmethod
    def from_json(cls, d: dict | "Task" | None, num_classes: int | None = None) -> "Task":
        if isinstance(d, Task):
            return d
        if not d:
            return cls("identity", ["identity"], [int(num_classes or 0)], [])
        try:
            return cls(str(d["kind"]), list(d.get("names") or ["identity"]), list(d.get("classes") or []),
                       list(d.get("vocab") or []))
        except (KeyError, TypeError) as e:
            raise FacetoolError(f"malformed task description {d!r}: {e}") from None

    # -- shape -----------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    @property
    def num_outputs(self) -> int:
        return int(sum(self.classes))

    @property
    def num_heads(self) -> int:
        """Number of separate classifiers (A): 1 for identity / one attribute."""
        return len(self.classes)

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.classes).tolist()]

    def describe(self) -> str:
        if self.is_identity:
            return f"identity ({self.classes[0] if self.classes else '?'} classes)"
        if self.kind == "attribute":
            return f"attribute:{self.names[0]} ({', '.join(self.vocab[0])})"
        return f"attributes ({len(self.names)}: {', '.join(self.names)})"


def task_of(model: Any) -> Task:
    """The task a model was trained for: ``model.config["task"]``; identity (over ``num_classes``) when
    its config has none. The one reader: every command asks this function. (0.2.1 checkpoints also
    carried a copy in their meta; ``load_model`` reads the config's, or the meta's where only that exists.)"""
    cfg = getattr(model, "config", {}) or {}
    return Task.from_json(cfg.get("task"), cfg.get("num_classes"))


def record_task(model: Any, task: Task | dict | None) -> None:
    """Store ``task`` in ``model.config["task"]`` (the checkpoint's one copy); identity tasks are not
    recorded (a model without one is an identity model)."""
    t = None if task is None else Task.from_json(task)
    if t is not None and not t.is_identity:
        model = getattr(model, "module", model)  # DDP
        model.config["task"] = t.to_json()


def split_logits(out, task: Task | dict) -> list:
    """(B, sum k_i) concatenated logits -> list of (B, k_i) per attribute (views, no copy)."""
    t = Task.from_json(task, out.shape[1])
    if t.is_identity:
        return [out]
    if out.shape[1] != t.num_outputs:
        raise FacetoolError(f"model output has {out.shape[1]} columns but the task needs {t.num_outputs}")
    o = t.offsets
    return [out[:, o[i]:o[i + 1]] for i in range(len(t.classes))]


def task_slice(task: Task | dict, name: str) -> slice:
    """Columns of the concatenated logits that belong to attribute ``name``."""
    t = Task.from_json(task)
    if t.is_identity:
        return slice(0, t.num_outputs) if name in ("identity", *t.names) else _no_name(t, name)
    if name not in t.names:
        _no_name(t, name)
    i = t.names.index(name)
    o = t.offsets
    return slice(o[i], o[i + 1])


def _no_name(t: Task, name: str):
    raise FacetoolError(f"the model's task has no attribute {name!r}; it has: {', '.join(t.names)}")


def owners(task: Task) -> list[int]:
    """For each output column, the index of the attribute it belongs to."""
    return [i for i, k in enumerate(task.classes) for _ in range(k)]


# -- building a task from a store -----------------------------------------------------------
def resolve_task(spec: str, store: str | Path, split: str = "train") -> Task:
    """Parse ``--task`` against a store: checks the attributes exist and have >= 2 values in use."""
    from facetool.store import FaceStore

    spec = (spec or "identity").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if Path(store).suffix.lower() not in (".h5", ".hdf5"):  # scale-out: a RecordIO pack holds identities only
        from facetool.data.recordio import RecordPack, is_rec_path

        if is_rec_path(store):
            if kind == "identity" and not arg:
                return Task("identity", ["identity"], [RecordPack(store).num_classes], [])
            raise FacetoolError(f"RecordIO pack {store} holds identities only: --task {spec} needs attributes "
                                "(a face store with them)")
    with FaceStore(store) as s:
        if kind == "identity" and not arg:
            return Task("identity", ["identity"], [s.num_classes], [])
        have = sorted(set(s.attribute_names("image")) | set(s.attribute_names("identity")))
        rows = s.indices(split)
        if kind == "attribute" and arg.strip():
            name = arg.strip()
            codes, vals = s.attribute(name)  # unknown name -> error listing the store's attributes
            _check_values(name, codes[rows], vals, split)
            return Task("attribute", [name], [len(vals)], [vals])
        if kind == "attributes":
            names = [a.strip() for a in arg.split(",") if a.strip()] if arg else have
            if not names:
                raise FacetoolError(f"store {Path(store).name} has no attributes; add them with `facetool annotate`")
            keep, vocab, skipped = [], [], []
            for n in names:
                codes, vals = s.attribute(n)
                try:
                    _check_values(n, codes[rows], vals, split)
                except FacetoolError:
                    if arg:  # named explicitly: refuse
                        raise
                    skipped.append(n)
                    continue
                keep.append(n)
                vocab.append(vals)
            if not keep:
                raise FacetoolError(f"no attribute of {Path(store).name} has two or more values in the {split} split "
                                    f"(has: {', '.join(have)})")
            return Task("attributes", keep, [len(v) for v in vocab], vocab)
    raise FacetoolError(f"unknown --task {spec!r}; use {TASK_HELP}")


def _check_values(name: str, codes: np.ndarray, vals: list[str], split: str) -> None:
    if len(vals) < 2:
        raise FacetoolError(f"attribute {name!r} has only one value ({', '.join(vals) or 'none'}); "
                            "a classifier needs two or more")
    used = sorted({int(c) for c in np.unique(codes) if c >= 0})
    if len(used) < 2:
        seen = ", ".join(vals[c] for c in used if c < len(vals)) or "none (all unknown)"
        raise FacetoolError(f"attribute {name!r} takes only one value in the {split} split ({seen}); "
                            "a classifier needs two or more")


def class_stats(store: str | Path, task: Task, split: str = "train") -> dict[str, dict]:
    """Per attribute: counts of each value in ``split``, unknowns, the majority value and its share
    (class imbalance; the majority-class baseline predicts that value for every image)."""
    from facetool.store import FaceStore

    out: dict[str, dict] = {}
    with FaceStore(store) as s:
        rows = s.indices(split)
        for i, name in enumerate(task.names):
            if task.is_identity:
                codes, vals = s.labels.astype(np.int64), None
            else:
                codes, vals = s.attribute(name)
            c = codes[rows]
            k = task.classes[i]
            known = c[(c >= 0) & (c < k)]
            counts = np.bincount(known, minlength=k)
            maj = int(counts.argmax()) if known.size else 0
            out[name] = {
                "counts": counts.tolist() if vals is None or k > 64 else {v: int(n) for v, n in zip(vals, counts)},
                "unknown": int(c.size - known.size),
                "majority": maj if vals is None else vals[maj],
                "majority_code": maj,
                "majority_share": float(counts[maj] / max(1, known.size)),
            }
    return out


# -- loss and metrics -----------------------------------------------------------------------
def targets(batch: dict, task: Task):
    """(B, A) integer targets of a batch (identity: the label)."""
    if task.is_identity:
        return batch["label"][:, None]
    return batch["attrs"]


def task_loss(out, batch: dict, task: Task):
    """Mean over heads of each head's cross-entropy over its known targets (-1 ignored; a head with
    no known target in the batch contributes 0)."""
    import torch
    from torch.nn import functional as F

    y = targets(batch, task)
    parts = split_logits(out.float(), task)
    total = out.new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(parts):
        t = y[:, i]
        known = t >= 0
        ce = F.cross_entropy(logits, t.clamp(min=0), reduction="none")
        total = total + (ce * known).sum() / known.sum().clamp(min=1)
    return total / len(parts)


def task_metrics(out, batch: dict, task: Task, majority: Sequence[int] | None = None) -> dict[str, float]:
    """``acc_<name>`` per head, their mean ``attr_acc`` and -- with the training majority codes --
    the majority baselines ``base_<name>`` and ``attr_base``. Accuracies are over the known targets
    of the batch (0 for a head without any)."""
    y = targets(batch, task)
    res: dict[str, float] = {}
    accs, bases = [], []
    for i, logits in enumerate(split_logits(out.detach(), task)):
        t = y[:, i]
        known = t >= 0
        n = max(1, int(known.sum()))
        acc = float(((logits.argmax(1) == t) & known).sum()) / n
        res[f"acc_{task.names[i]}"] = acc
        accs.append(acc)
        if majority is not None:
            b = float(((t == int(majority[i])) & known).sum()) / n
            res[f"base_{task.names[i]}"] = b
            bases.append(b)
    res["attr_acc"] = float(np.mean(accs))
    if bases:
        res["attr_base"] = float(np.mean(bases))
    return res


__all__ = ["Task", "KINDS", "TASK_HELP", "task_of", "record_task", "split_logits", "task_slice", "owners",
           "resolve_task", "class_stats", "targets", "task_loss", "task_metrics"]
