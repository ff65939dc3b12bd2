"""What a relevance map explains: a class logit (``label``, ``predicted``, ``attribute:NAME``) or
the cosine of an embedding to a reference (``cosine``), resolved per image into :class:`Explained`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError
from facetool.tasks import task_of


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


def attribute_slice(model: nn.Module, name: str) -> slice:
    """The logits of attribute ``name`` in the model's output (:func:`facetool.tasks.task_slice` of the
    model's task, CONTRACTS.md "Tasks")."""
    from facetool.tasks import task_slice

    task = task_of(model)
    if task.kind not in ("attribute", "attributes"):
        raise FacetoolError(f"--target attribute:{name} needs an attribute model (train with --task attribute:{name}); "
                            f"this model's task is {task.kind}")
    return task_slice(task, name)


def check_target(model: nn.Module, target: Target) -> None:
    """Refuse targets the model cannot explain (one-line errors): class targets need a model whose
    ``output_kind`` is classification, ``cosine`` an embedding model (CONTRACTS.md "Models")."""
    is_classifier = getattr(model, "output_kind", "classification") == "classification"
    kind = task_of(model).kind
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
        out = forward(model, x)
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
    task = task_of(model)
    head = task.names.index(target.attribute) if task.kind == "attributes" else None
    return Explained(classes=torch.where(codes >= 0, codes, pred), sl=sl, head=head)


def forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` on the model's device, the output back on the CPU (the relevance code keeps its
    images and results there)."""
    p = next(iter(model.parameters()), None)
    out = model(x.to(p.device) if p is not None else x)
    return out.cpu() if isinstance(out, Tensor) else out


def embed(model: nn.Module, x: Tensor, batch: int = 64) -> Tensor:
    with torch.no_grad():
        if not len(x):
            return x.new_zeros(0)
        return torch.cat([forward(model, x[i:i + batch]) for i in range(0, len(x), batch)])
