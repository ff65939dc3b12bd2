"""The frozen teacher: a facetool checkpoint, an arcface_torch ``backbone.pth`` or an ONNX file, with
its classifier (its own head, or ``--teacher-head`` files in the published formats), read through
removable forward hooks; never trained, never modified."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError, require_file
from facetool.hooks import taps
from facetool.trainers.distill.losses import pooled


# -- the teacher ------------------------------------------------------------------------------------
class Teacher:
    """A frozen teacher: a facetool model (classifier or embedding backbone) or an ONNX embedder,
    plus, for embedding models, an optional frozen classification head (``MarginHead`` or
    ``SoftmaxHead``) whose logits are the scaled cosines ``s * cos`` *without* the margin (the margin is
    a training device for the target class; distillation matches the teacher's inference-time scores).
    """

    def __init__(self, model: Any, head: nn.Module | None = None, source: str = "") -> None:
        self.model = model
        self.head = head
        self.source = source
        self.is_torch = isinstance(model, nn.Module)
        self.output_kind = getattr(model, "output_kind", "embedding")
        if self.output_kind == "classification" and head is not None:
            raise FacetoolError(f"teacher {source} is a classifier; --teacher-head is for embedding teachers")
        for m in (model, head):
            if isinstance(m, nn.Module):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)
        cfg = getattr(model, "config", {}) or {}
        self.input_size = int(cfg.get("input_size") or getattr(model, "input_size", 0) or 0) or None
        self.device = torch.device("cpu")

    @property
    def has_logits(self) -> bool:
        return self.output_kind == "classification" or self.head is not None

    @property
    def num_classes(self) -> int | None:
        if self.output_kind == "classification":
            n = (getattr(self.model, "config", {}) or {}).get("num_classes")
            return int(n) if n is not None else None
        if self.head is None:
            return None
        w = self.head.weight if hasattr(self.head, "weight") else self.head.fc.weight
        return int(w.shape[0])

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "layer_names", ())) if self.is_torch else ()

    @property
    def fmap_layer(self) -> str:
        return getattr(self.model, "cam_layer", "") if self.is_torch else ""

    def to(self, device: torch.device) -> "Teacher":
        if device != self.device:
            for m in (self.model, self.head):
                if isinstance(m, nn.Module):
                    m.to(device)
            self.device = device
        return self

    def head_logits(self, h: Tensor) -> Tensor:
        """Frozen classifier scores of penultimate features ``h`` (autograd flows to ``h``)."""
        if self.output_kind == "classification":
            raise RuntimeError("classifier teachers score feature maps (head_from_map)")
        return self.head(h) if self.head is not None else None  # MarginHead without labels: s * cos

    def head_from_map(self, f: Tensor) -> tuple[Tensor, Tensor | None]:
        """(h, logits) of a feature map in the teacher's space through the teacher's frozen head:
        classifiers pool and apply their classifier; embedding models run their embedding head
        (``forward_head``) and the classification head. Gradients flow to ``f`` only."""
        if self.output_kind == "classification":
            return pooled(f), self.model.forward_head(f)
        h = self.model.forward_head(f)
        return h, (self.head_logits(h) if self.head is not None else None)

    def _resize(self, x: Tensor) -> Tensor:
        s = self.input_size
        if s and x.shape[-1] != s and self.is_torch:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def run(self, x: Tensor, layers: Sequence[str] = ()) -> dict[str, Any]:
        """Teacher outputs under ``torch.inference_mode``, returned as ordinary tensors: ``out``,
        ``h`` (pooled penultimate feature / embedding), ``logits`` (or None), ``fmap`` (last map) and
        ``feats`` (the requested named stages)."""
        self.to(x.device)
        names = list(layers) + ([self.fmap_layer] if self.fmap_layer else [])
        with torch.inference_mode():
            x = self._resize(x)
            if self.is_torch:
                with taps(self.model, names) as found:
                    out = self.model(x)
                fmap = found.get(self.fmap_layer)
                feats = {n: found[n] for n in layers}
            else:
                out, fmap, feats = self.model(x), None, {}
            if self.output_kind == "classification":
                h, logits = pooled(fmap), out
            else:
                h, logits = out, (self.head_logits(out) if self.head is not None else None)
        keep = lambda t: None if t is None else t.clone()  # noqa: E731 - normal tensors usable in autograd
        return {"out": keep(out), "h": keep(h), "logits": keep(logits), "fmap": keep(fmap),
                "feats": {n: keep(v) for n, v in feats.items()}}


def margin_name(head: nn.Module) -> str:
    from facetool.models.heads import MARGINS

    m = (head.m1, head.m2, head.m3)
    return next((k for k, v in MARGINS.items() if tuple(v) == m), "combined")


# -- teacher -----------------------------------------------------------------------------------------
def _head_tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The classifier tensors of a head file: facetool ``heads.pt`` ({"head": {...}}), arcface_torch
    ``checkpoint_gpu_*.pt`` ({"state_dict_softmax_fc": {"weight": ...}}), a {"weight": ...} state_dict
    or a bare (classes, dim) tensor."""
    if isinstance(obj, torch.Tensor):
        return {"weight": obj}
    if isinstance(obj, dict):
        for key in ("head", "state_dict_softmax_fc"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "weight" in tensors:
            return {"weight": tensors["weight"]}
        if "fc.weight" in tensors:
            return {"weight": tensors["fc.weight"], "bias": tensors.get("fc.bias")}
    raise FacetoolError(f"teacher head {path} holds no classifier weight (expected a (classes, dim) 'weight' tensor, "
                        "a facetool heads.pt or an arcface_torch checkpoint with state_dict_softmax_fc)")


def load_head(paths: Sequence[str | Path], embedding_size: int, loss: str | None, scale: float | None,
              meta: dict) -> nn.Module:
    """A frozen head from one or more files (model-parallel shards are concatenated in the given
    order). Margin heads score with ``s * cos`` (no margin while distilling)."""
    from facetool.io import torch_load
    from facetool.models.heads import MARGINS, MarginHead, SoftmaxHead

    from facetool.models.checkpoint import check_finite

    parts = [_head_tensors(torch_load(require_file(p, "teacher head"), "teacher head"), Path(p)) for p in paths]
    for p, part in zip(paths, parts):
        check_finite(part, f"teacher head {p}")  # a NaN head would end as a NaN loss blamed on --lr
    w = torch.cat([p["weight"].float() for p in parts])
    bias = [p.get("bias") for p in parts]
    if w.dim() != 2 or w.shape[1] != embedding_size:
        raise FacetoolError(f"teacher head {paths[0]} has weight {tuple(w.shape)}; expected (classes, {embedding_size}) "
                            "for this teacher's embedding")
    loss = loss or meta.get("loss") or ("softmax" if all(b is not None for b in bias) else "arcface")
    if loss == "softmax":
        if any(b is None for b in bias):
            raise FacetoolError("a softmax teacher head needs fc.weight and fc.bias; use --teacher-loss arcface|cosface")
        head = SoftmaxHead(embedding_size, w.shape[0])
        head.fc.weight.data.copy_(w)
        head.fc.bias.data.copy_(torch.cat([b.float() for b in bias]))
        return head
    if loss not in MARGINS and loss != "combined":
        raise FacetoolError(f"unknown --teacher-loss {loss!r}; use arcface, cosface or softmax")
    margins = tuple(meta.get("margins") or MARGINS.get(loss, (1.0, 0.5, 0.0)))
    head = MarginHead(embedding_size, w.shape[0], margins, float(scale or meta.get("s") or 64.0))
    head.weight.data.copy_(w)
    return head


def load_teacher(path: str | Path, heads: Sequence[str | Path] = (), loss: str | None = None,
                 scale: float | None = None, arch: str | None = None) -> Teacher:
    """A frozen teacher from a facetool checkpoint, an arcface_torch ``backbone.pth`` or an ONNX file.
    An embedding checkpoint written by ``facetool train arcface`` finds its ``heads.pt`` beside it.
    ``arch`` (``--teacher-arch``): the architecture of a file that records none."""
    from facetool.models import load_model

    p = require_file(path, "teacher")
    try:
        model = load_model(p, name=arch, option="--teacher-arch")
    except FacetoolError as e:
        raise FacetoolError(f"teacher {p} failed to load: {e}") from None
    meta = getattr(model, "meta", {}) or {}
    head_files = [Path(h) for h in heads]
    if not head_files and getattr(model, "output_kind", "") == "embedding" and (p.parent / "heads.pt").is_file() \
            and meta.get("num_classes") and p.suffix != ".onnx":
        head_files = [p.parent / "heads.pt"]
    head = None
    if head_files:
        if getattr(model, "output_kind", "") == "classification":
            raise FacetoolError(f"teacher {p} is a classifier; --teacher-head is only for embedding teachers")
        emb = int(getattr(model, "embedding_size", 0) or (model.config or {}).get("embedding_size", 512))
        head = load_head(head_files, emb, loss, scale, meta)
    return Teacher(model, head, str(p))
