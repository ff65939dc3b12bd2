"""Knowledge distillation on the training engine: SRRL and the baselines it is measured against.

``DistillMethod(kind, teacher, student, ...)`` is one :class:`facetool.engine.Method` for every
``kind`` in :data:`METHODS`; each loss is a small function here (or in :mod:`facetool.methods.srrl`)
unit-tested against hand-computed values. Conventions are RepDistiller's (HobbitLong) for the
baselines and the thesis' for SRRL; the total loss is

    gamma * L_CE  +  alpha * L_KL(T)  +  beta * L_other          (RepDistiller: -r, -a, -b)
    gamma * L_CE  +  alpha * L_FM     +  beta * L_SR             (SRRL, Eqs. 4.3/4.7/4.8)
    ... + lambda * L_KD(unlabeled or mixed images)               (thesis section 4.2.2)

with the per-method defaults of :data:`DEFAULT_WEIGHTS` (KD: 0.1 / 0.9 / 0 at T = 4; FitNet beta 100;
AT 1000; RKD 1 with distance 25 + angle 50 inside; PKT 30000; SRRL 1 / 1 / 1).

The teacher (:class:`Teacher`) is frozen: eval mode, ``requires_grad=False``, never in the optimizer,
its targets computed under ``torch.inference_mode``. Only SRRL runs the *student's* connected feature
through the teacher's head with autograd on, so gradients reach the student through W_T while W_T
stays fixed. Intermediate features are read with forward hooks (:func:`taps`, a context manager that
removes them again); no model is modified.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.engine import Method, topk_accuracy
from facetool.errors import FacetoolError
from facetool.methods.srrl import SR_LOSSES, Connector, fm_loss, match_size, sr_loss

METHODS = ("srrl", "kd", "fitnet", "at", "rkd", "pkt", "none")

#: (gamma = CE weight, alpha = KL weight (SRRL: L_FM), beta = the method's own term (SRRL: L_SR))
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "srrl": {"gamma": 1.0, "alpha": 1.0, "beta": 1.0},
    "kd": {"gamma": 0.1, "alpha": 0.9, "beta": 0.0},
    "fitnet": {"gamma": 1.0, "alpha": 0.0, "beta": 100.0},
    "at": {"gamma": 1.0, "alpha": 0.0, "beta": 1000.0},
    "rkd": {"gamma": 1.0, "alpha": 0.0, "beta": 1.0},
    "pkt": {"gamma": 1.0, "alpha": 0.0, "beta": 30000.0},
    "none": {"gamma": 1.0, "alpha": 0.0, "beta": 0.0},
}
#: what alpha and beta weigh, per method (printed in the run's config)
WEIGHT_MEANING = {
    "srrl": ("L_FM", "L_SR"), "kd": ("KL(T)", "-"), "fitnet": ("KL(T)", "hint MSE"), "at": ("KL(T)", "AT"),
    "rkd": ("KL(T)", "RKD (25 dist + 50 angle)"), "pkt": ("KL(T)", "PKT"), "none": ("-", "-"),
}
#: methods that read the teacher's feature maps (impossible with an ONNX teacher)
NEEDS_FEATURES = ("srrl", "fitnet", "at")
RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0
PKT_EPS = 1e-7


# -- the losses ------------------------------------------------------------------------------------
def kd_loss(logits_s: Tensor, logits_t: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, averaged over the batch."""
    return soft_kd_loss(logits_s, F.softmax(logits_t.detach().float() / T, 1), T)


def soft_kd_loss(logits_s: Tensor, target: Tensor, T: float = 4.0) -> Tensor:
    """KL(target || softmax(s/T)) * T^2 for given target probabilities (mixed teacher predictions)."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), target.detach().float(), reduction="batchmean") * T * T


def hint_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """FitNet: mean squared error between the regressed student map and the teacher's hint map."""
    return F.mse_loss(f_s.float(), f_t.detach().float())


def attention_map(f: Tensor, p: int = 2) -> Tensor:
    """Zagoruyko & Komodakis: L2-normalised, flattened channel mean of |f|^p."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor], p: int = 2) -> Tensor:
    """Attention transfer summed over stage pairs: mean squared difference of the attention maps;
    the larger map of a pair is average-pooled to the smaller one's size."""
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(feats_s, feats_t):
        hs, ht = fs.shape[-1], ft.shape[-1]
        if hs > ht:
            fs = F.adaptive_avg_pool2d(fs, ft.shape[-2:])
        elif hs < ht:
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
        total = total + (attention_map(fs, p) - attention_map(ft.detach(), p)).pow(2).mean()
    return total


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix (zero diagonal) of the rows of ``e``."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_loss(h_s: Tensor, h_t: Tensor, w_distance: float = RKD_DISTANCE, w_angle: float = RKD_ANGLE) -> Tensor:
    """Relational KD: smooth-L1 between mean-normalised distance matrices (weight 25) plus smooth-L1
    between the cosine of every angle (anchor, i, j) (weight 50)."""
    s, t = h_s.float().flatten(1), h_t.detach().float().flatten(1)

    def normalised(e: Tensor) -> Tensor:
        d = pairwise_distances(e)
        pos = d[d > 0]
        return d / pos.mean() if pos.numel() else d

    loss_d = F.smooth_l1_loss(normalised(s), normalised(t))

    def angles(e: Tensor) -> Tensor:
        v = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # v[a, i] = unit(e_i - e_a)
        return torch.bmm(v, v.transpose(1, 2)).flatten()

    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    return w_distance * loss_d + w_angle * loss_a


def pkt_loss(h_s: Tensor, h_t: Tensor, eps: float = PKT_EPS) -> Tensor:
    """Probabilistic knowledge transfer: cosine-similarity kernels mapped to [0, 1], normalised per
    row into conditional distributions, mean of t * log((t + eps) / (s + eps))."""

    def conditional(e: Tensor) -> Tensor:
        e = e.float().flatten(1)
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        e = torch.nan_to_num(e, nan=0.0)
        k = (e @ e.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = conditional(h_s), conditional(h_t.detach())
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def mixup_images(x: Tensor, u: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Mix each labeled image with an unlabeled one: lambda ~ Beta(alpha, alpha) per image,
    lambda' = max(lambda, 1 - lambda) (the labeled image dominates); returns (mixed, lambda').
    Draws from torch's global generator, which the engine's resume state restores."""
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((x.shape[0],))
    lam = torch.maximum(lam, 1 - lam).to(x.device, x.dtype)
    w = lam.view(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * u, lam


# -- feature taps ----------------------------------------------------------------------------------
@contextlib.contextmanager
def taps(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named stages (``model.get_layer(name)``) of every forward while
    the block runs; the hooks are removed on exit, leaving the model as it was."""
    found: dict[str, Tensor] = {}
    handles = []
    try:
        for n in dict.fromkeys(names):
            layer = model.get_layer(n) if hasattr(model, "get_layer") else model.get_submodule(n)

            def hook(_m, _inp, out, n=n):
                found[n] = out

            handles.append(layer.register_forward_hook(hook))
        yield found
    finally:
        for h in handles:
            h.remove()


def pooled(f: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1) if f.dim() == 4 else f


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
        self.task = getattr(model, "task", "embedding")
        if self.task == "classification" and head is not None:
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
        return self.task == "classification" or self.head is not None

    @property
    def num_classes(self) -> int | None:
        if self.task == "classification":
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
        if self.task == "classification":
            raise RuntimeError("classifier teachers score feature maps (head_from_map)")
        return self.head(h) if self.head is not None else None  # MarginHead without labels: s * cos

    def head_from_map(self, f: Tensor) -> tuple[Tensor, Tensor | None]:
        """(h, logits) of a feature map in the teacher's space through the teacher's frozen head:
        classifiers pool and apply their classifier; embedding models run their embedding head
        (``forward_head``) and the classification head. Gradients flow to ``f`` only."""
        if self.task == "classification":
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
            if self.task == "classification":
                h, logits = pooled(fmap), out
            else:
                h, logits = out, (self.head_logits(out) if self.head is not None else None)
        keep = lambda t: None if t is None else t.clone()  # noqa: E731 - normal tensors usable in autograd
        return {"out": keep(out), "h": keep(h), "logits": keep(logits), "fmap": keep(fmap),
                "feats": {n: keep(v) for n, v in feats.items()}}


# -- the method ------------------------------------------------------------------------------------
def resolve_weights(kind: str, alpha: float | None = None, beta: float | None = None,
                    gamma: float | None = None) -> dict[str, float]:
    if kind not in METHODS:
        raise FacetoolError(f"unknown distillation method {kind!r}; use one of {', '.join(METHODS)}")
    w = dict(DEFAULT_WEIGHTS[kind])
    for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if v is not None:
            if not (v >= 0 and v < float("inf")):
                raise FacetoolError(f"--{k} must be a finite number >= 0, got {v}")
            w[k] = float(v)
    return w


class DistillMethod(Method):
    """Train ``student`` from the frozen ``teacher`` with distillation method ``kind``.

    ``student_head``: the student's own classification head when the student is an embedding model
    (trained with it: margin CE); classifier students use their own ``fc``. ``probe``: a few training
    images (any device) to size the connector / regressor. Use :meth:`attached` around training so the
    student's stages are tapped.
    """

    def __init__(self, kind: str, teacher: Teacher | None, student: nn.Module, *, probe: Tensor,
                 weights: dict[str, float] | None = None, temperature: float = 4.0, sr_loss: str = "l2",
                 student_head: nn.Module | None = None, hint: tuple[str, str] | None = None,
                 unlabeled_weight: float = 0.0, mixup: float = 0.0) -> None:
        self.kind = kind
        self.name = f"distill-{kind}"
        self.weights = weights or resolve_weights(kind)
        if not temperature > 0:
            raise FacetoolError(f"--temperature must be positive, got {temperature}")
        if sr_loss not in SR_LOSSES:
            raise FacetoolError(f"unknown --sr-loss {sr_loss!r}; use one of {', '.join(SR_LOSSES)}")
        if mixup < 0:
            raise FacetoolError(f"--mixup must be >= 0 (the Beta distribution's parameter), got {mixup}")
        self.T, self.sr_kind = float(temperature), sr_loss
        self.teacher, self.student_head = teacher, student_head
        self.student_task = getattr(student, "task", "classification")
        self.unlabeled_weight, self.mixup = float(unlabeled_weight), float(mixup)
        self.notes: list[str] = []
        self._s: dict[str, Tensor] = {}
        self._t_logits: Tensor | None = None
        if kind != "none" and teacher is None:
            raise FacetoolError(f"distillation method {kind} needs a --teacher")
        if teacher is not None and not teacher.is_torch and kind in NEEDS_FEATURES:
            raise FacetoolError(f"teacher {teacher.source} is an ONNX model: method {kind} needs its feature maps; "
                                "with an ONNX teacher use rkd, pkt, none (or kd with --teacher-head)")
        if kind == "kd" and not teacher.has_logits:
            raise FacetoolError(f"kd needs the teacher's classifier, but {teacher.source} is an embedding model "
                                "without a head; pass --teacher-head (or use srrl, rkd, pkt)")
        if self.unlabeled_weight > 0 and (teacher is None or not teacher.has_logits):
            raise FacetoolError("--unlabeled needs the teacher's predictions: a classifier teacher or --teacher-head")
        self.use_sr = kind == "srrl" and teacher.has_logits and self.weights["beta"] > 0
        if kind == "srrl" and not teacher.has_logits:
            self.notes.append("the teacher has no classifier (no --teacher-head): SRRL falls back to L_FM on the "
                              "embedding (no L_SR)")
        self.s_fmap = getattr(student, "cam_layer", "")
        self.hint = None
        self.at_pairs: list[tuple[str, str]] = []
        self.connector: nn.Module | None = None
        self.regressor: nn.Module | None = None
        if kind == "fitnet":
            self.hint = hint or (teacher.layer_names[1], student.layer_names[1])
            teacher.model.get_layer(self.hint[0]), student.get_layer(self.hint[1])  # names checked
        if kind == "at":
            tl, sl = teacher.layer_names, tuple(student.layer_names)
            if len(tl) != len(sl):
                raise FacetoolError(f"at pairs stages by position: the teacher has {len(tl)} ({', '.join(tl)}), the "
                                    f"student {len(sl)} ({', '.join(sl)})")
            self.at_pairs = list(zip(tl, sl))
        if kind in ("srrl", "fitnet"):
            self._build_adapters(student, probe)

    # stages of the student this method reads
    @property
    def student_layers(self) -> list[str]:
        names = [self.s_fmap] if self.s_fmap else []
        if self.hint:
            names.append(self.hint[1])
        names += [s for _, s in self.at_pairs]
        return names

    @property
    def teacher_layers(self) -> list[str]:
        return ([self.hint[0]] if self.hint else []) + [t for t, _ in self.at_pairs]

    def _build_adapters(self, student: nn.Module, probe: Tensor) -> None:
        was = student.training
        student.eval()
        try:
            with torch.no_grad(), taps(student, self.student_layers) as sf:
                student(probe.to(next(student.parameters()).device))
            t = self.teacher.run(probe, self.teacher_layers)
        finally:
            student.train(was)
        if self.kind == "srrl":
            fs, ft = sf[self.s_fmap], t["fmap"]
            relu = bool((ft >= 0).all())
            self.connector = Connector(fs.shape[1], ft.shape[1], relu, tuple(ft.shape[-2:]))
            if not relu:
                self.notes.append("the teacher's feature map is signed: the connector has no ReLU")
        else:
            fs, ft = sf[self.hint[1]], t["feats"][self.hint[0]]
            relu = bool((ft >= 0).all())
            layers: list[nn.Module] = [nn.Conv2d(fs.shape[1], ft.shape[1], 3, 1, 1, bias=False), nn.BatchNorm2d(ft.shape[1])]
            if relu:
                layers.append(nn.ReLU())
            self.regressor = nn.Sequential(*layers)
            self.hint_size = tuple(ft.shape[-2:])

    @contextlib.contextmanager
    def attached(self, student: nn.Module) -> Iterator["DistillMethod"]:
        """Tap the student's stages for the duration of training (hooks removed on exit)."""
        with taps(student, self.student_layers) as found:
            self._s = found
            try:
                yield self
            finally:
                self._s = {}

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {}
        if self.student_head is not None:
            mods["head"] = self.student_head
        if self.connector is not None:
            mods["connector"] = self.connector
        if self.regressor is not None:
            mods["regressor"] = self.regressor
        return mods

    # student outputs ----------------------------------------------------------------------------
    def student_logits(self, out: Tensor) -> Tensor:
        """Plain class scores of the student (its own classifier; s * cos for margin heads)."""
        return out if self.student_head is None else self.student_head(out)

    def student_feature(self, out: Tensor) -> Tensor:
        """The student's own penultimate feature: pooled last map (classifiers) or the embedding."""
        if self.student_task == "classification":
            return pooled(self._s[self.s_fmap])
        return out

    def _ce(self, out: Tensor, labels: Tensor) -> Tensor:
        if self.student_head is None:
            return F.cross_entropy(out.float(), labels)
        return F.cross_entropy(self.student_head(out, labels), labels)

    # the loss -------------------------------------------------------------------------------------
    def loss(self, model, batch, out, internals):
        w, kind = self.weights, self.kind
        for m in self.modules().values():  # the engine validates with the model in eval mode: follow it
            m.train(model.training)
        terms: dict[str, Tensor] = {}
        labels = batch["label"]
        if w["gamma"] > 0:
            terms["ce"] = w["gamma"] * self._ce(out, labels)
        self._t_logits = None
        if kind == "none" and self.unlabeled_weight == 0:
            return terms
        t = self.teacher.run(batch["image"], self.teacher_layers)
        self._t_logits = t["logits"]
        if w["alpha"] > 0 and kind != "srrl":
            terms["kd"] = w["alpha"] * kd_loss(self.student_logits(out), t["logits"], self.T)
        if kind == "srrl":
            h_s, z_s = self.teacher.head_from_map(self.connector(self._s[self.s_fmap]))
            if w["alpha"] > 0:
                terms["fm"] = w["alpha"] * fm_loss(h_s, t["h"])
            if self.use_sr:
                terms["sr"] = w["beta"] * sr_loss(z_s, t["logits"], self.sr_kind)
        elif kind == "fitnet" and w["beta"] > 0:
            f = match_size(self.regressor(self._s[self.hint[1]]), self.hint_size)
            terms["fitnet"] = w["beta"] * hint_loss(f, t["feats"][self.hint[0]])
        elif kind == "at" and w["beta"] > 0:
            terms["at"] = w["beta"] * at_loss([self._s[s] for _, s in self.at_pairs],
                                              [t["feats"][n] for n, _ in self.at_pairs])
        elif kind == "rkd" and w["beta"] > 0:
            terms["rkd"] = w["beta"] * rkd_loss(self.student_feature(out), t["h"])
        elif kind == "pkt" and w["beta"] > 0:
            terms["pkt"] = w["beta"] * pkt_loss(self.student_feature(out), t["h"])
        if self.unlabeled_weight > 0 and "u_image" in batch:
            terms["kd_unlabeled"] = self.unlabeled_weight * self._unlabeled(model, batch, t["logits"])
        return terms

    def _unlabeled(self, model: nn.Module, batch: dict, t_logits: Tensor) -> Tensor:
        """KD on the unlabeled images (after the labeled terms: the student forward re-fires the taps);
        with mixup the student sees mixed images and the target is the same mix of the teacher's
        predictions (at temperature T) on the labeled and the unlabeled image (Eqs. 4.11-4.12)."""
        u = batch["u_image"]
        tu = self.teacher.run(u)["logits"]
        if self.mixup > 0:
            x, lam = mixup_images(batch["image"], u, self.mixup)
            lam = lam.float()[:, None]
            target = lam * F.softmax(t_logits.float() / self.T, 1) + (1 - lam) * F.softmax(tu.float() / self.T, 1)
        else:
            x, target = u, F.softmax(tu.float() / self.T, 1)
        return soft_kd_loss(self.student_logits(model(x)), target, self.T)

    def metrics(self, batch, out, internals):
        with torch.no_grad():
            logits = self.student_logits(out).float()
            m = topk_accuracy(logits, batch["label"])
            if self._t_logits is not None and self._t_logits.shape == logits.shape:
                m["agree"] = float((logits.argmax(1) == self._t_logits.argmax(1)).float().mean())
        return m

    def meta(self) -> dict:
        a, b = WEIGHT_MEANING[self.kind]
        d: dict[str, Any] = {
            "distill": {
                "method": self.kind, "weights": dict(self.weights), "alpha_weighs": a, "beta_weighs": b,
                "temperature": self.T, "sr_loss": self.sr_kind if self.kind == "srrl" else None,
                "teacher": self.teacher.source if self.teacher else None,
                "teacher_margin_applied": False,
                "hint": list(self.hint) if self.hint else None,
                "at_pairs": [list(p) for p in self.at_pairs] or None,
                "connector_relu": getattr(self.connector, "relu", None),
                "unlabeled_weight": self.unlabeled_weight, "mixup": self.mixup, "notes": list(self.notes),
            }
        }
        head = self.student_head
        if head is not None:  # as ArcFaceMethod records it, so recognition tools read it alike
            d.update({"loss": "softmax" if not hasattr(head, "m1") else _margin_name(head),
                      "margins": [head.m1, head.m2, head.m3] if hasattr(head, "m1") else None,
                      "s": getattr(head, "s", None)})
        return d


def _margin_name(head: nn.Module) -> str:
    from facetool.models.heads import MARGINS

    m = (head.m1, head.m2, head.m3)
    return next((k for k, v in MARGINS.items() if tuple(v) == m), "combined")


__all__ = ["METHODS", "DEFAULT_WEIGHTS", "NEEDS_FEATURES", "DistillMethod", "Teacher", "taps", "kd_loss",
           "soft_kd_loss", "hint_loss", "attention_map", "at_loss", "rkd_loss", "pkt_loss", "pairwise_distances",
           "mixup_images", "resolve_weights", "pooled"]
