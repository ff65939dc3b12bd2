"""``DistillMethod``: one :class:`facetool.engine.Method` for every distillation kind."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.engine import Method
from facetool.errors import FacetoolError
from facetool.hooks import taps
from facetool.trainers.classify import topk_accuracy
from facetool.trainers.distill.losses import (NEEDS_FEATURES, WEIGHT_MEANING, at_loss, hint_loss, kd_loss, mixup_images,
                                              pkt_loss, pooled, resolve_weights, rkd_loss, soft_kd_loss)
from facetool.trainers.distill.teacher import Teacher, margin_name
from facetool.trainers.srrl import SR_LOSSES, Connector, fm_loss, match_size, sr_loss


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
                 unlabeled_weight: float = 0.0, mixup: float = 0.0, plus: str | None = None) -> None:
        from facetool.trainers.distill.losses import PLUS_WEIGHTS, check_plus

        self.kind = kind
        check_plus(kind, plus)
        self.plus, self.plus_weight = plus, (PLUS_WEIGHTS[plus] if plus else 0.0)
        self.name = f"distill-{kind}" + (f"+{plus}" if plus else "")
        self.weights = weights or resolve_weights(kind)
        if not temperature > 0:
            raise FacetoolError(f"--temperature must be positive, got {temperature}")
        if sr_loss not in SR_LOSSES:
            raise FacetoolError(f"unknown --sr-loss {sr_loss!r}; use one of {', '.join(SR_LOSSES)}")
        if mixup < 0:
            raise FacetoolError(f"--mixup must be >= 0 (the Beta distribution's parameter), got {mixup}")
        self.T, self.sr_kind = float(temperature), sr_loss
        self.teacher, self.student_head = teacher, student_head
        self.student_output_kind = getattr(student, "output_kind", "classification")
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
        if self.weights["alpha"] > 0 and kind not in ("srrl", "none", "kd") and not teacher.has_logits:
            raise FacetoolError(f"--alpha weighs KL(T) on the teacher's classifier, but {teacher.source} is an "
                                "embedding model without a head: pass --teacher-head, or --alpha 0")
        self._check_some_term()
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
        if plus == "kd" and not teacher.has_logits:
            raise FacetoolError(f"--plus kd needs the teacher's classifier, but {teacher.source} is an embedding model "
                                "without a head; pass --teacher-head")
        if kind == "at" or plus == "at":
            tl, sl = teacher.layer_names, tuple(student.layer_names)
            if len(tl) != len(sl):
                raise FacetoolError(f"at pairs stages by position: the teacher has {len(tl)} ({', '.join(tl)}), the "
                                    f"student {len(sl)} ({', '.join(sl)})")
            self.at_pairs = list(zip(tl, sl))
        if kind in ("srrl", "fitnet"):
            self._build_adapters(student, probe)

    def _check_some_term(self) -> None:
        """At least one loss term has a weight > 0: an all-zero loss has nothing to train (refused before
        any work, naming the weights this method uses)."""
        w, kind = self.weights, self.kind
        active = [w["gamma"] > 0, self.unlabeled_weight > 0]
        if kind == "srrl":
            active += [w["alpha"] > 0, self.use_sr]
        elif kind != "none":
            active += [w["alpha"] > 0, kind != "kd" and w["beta"] > 0]
        if any(active):
            return
        a, b = WEIGHT_MEANING[kind]
        uses = [f"--{k} ({m})" for k, m in (("alpha", a), ("beta", b), ("gamma", "CE")) if m != "-"]
        dropped = " (L_SR is dropped: the teacher has no classifier)" if kind == "srrl" and w["beta"] > 0 else ""
        raise FacetoolError(f"the loss of {kind} would be 0 with --alpha {w['alpha']:g}, --beta {w['beta']:g} and "
                            f"--gamma {w['gamma']:g}{dropped}: at least one loss weight must be > 0; {kind} uses "
                            f"{', '.join(uses)}")

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

    @property
    def partial_fc(self) -> float | None:
        """The sample rate of a PartialFC student head (its classes split over the ranks), else None."""
        from facetool.models.partial_fc import PartialFC

        return self.student_head.sample_rate if isinstance(self.student_head, PartialFC) else None

    def sharded_modules(self) -> dict[str, nn.Module]:
        """A PartialFC student head holds this rank's classes: its own optimizer state, saved per rank."""
        return {"head": self.student_head} if self.partial_fc is not None else {}

    def merge_shards(self, parts):
        """heads.pt gets the student's head over all classes, a MarginHead's state_dict (``weight`` (C, D))."""
        if self.partial_fc is None:
            return {}
        from facetool.models.partial_fc import PartialFC

        return {"head": PartialFC.merge([p["head"] for p in parts])}

    def use_merged_head(self, path, device) -> None:
        """After a PartialFC run (rank 0): the student head becomes the merged one from ``heads.pt``, a plain
        :class:`~facetool.models.heads.MarginHead` that scores every class (for the diagnostics)."""
        from facetool.io import torch_load
        from facetool.models.heads import MarginHead

        pfc = self.student_head
        head = MarginHead(pfc.embedding_size, pfc.num_classes, (pfc.m1, pfc.m2, pfc.m3), s=pfc.s,
                          easy_margin=pfc.easy_margin)
        head.load_state_dict(torch_load(path, "merged head")["head"])
        self.student_head = head.to(device).eval()

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {}
        if self.student_head is not None and self.partial_fc is None:
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
        if self.student_output_kind == "classification":
            return pooled(self._s[self.s_fmap])
        return out

    def _ce(self, out: Tensor, labels: Tensor) -> Tensor:
        if self.student_head is None:
            return F.cross_entropy(out.float(), labels)
        if self.partial_fc is not None:  # the loss itself (distributed cross-entropy over every rank's batch)
            return self.student_head(out, labels)
        return F.cross_entropy(self.student_head(out, labels), labels)

    # the loss -------------------------------------------------------------------------------------
    def loss(self, model, batch, out, internals):
        w, kind = self.weights, self.kind
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
            if self.plus == "kd":
                terms["plus_kd"] = self.plus_weight * kd_loss(self.student_logits(out), t["logits"], self.T)
            elif self.plus == "at":
                terms["plus_at"] = self.plus_weight * at_loss([self._s[s] for _, s in self.at_pairs],
                                                              [t["feats"][n] for n, _ in self.at_pairs])
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
        if self.partial_fc is not None:  # top-1 over the whole batch among the centres the step used
            return {"top1": self.student_head.last_top1}
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
                "method": self.kind, "plus": self.plus, "plus_weight": self.plus_weight,
                "weights": dict(self.weights), "alpha_weighs": a, "beta_weighs": b,
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
            d.update({"loss": "softmax" if not hasattr(head, "m1") else margin_name(head),
                      "margins": [head.m1, head.m2, head.m3] if hasattr(head, "m1") else None,
                      "s": getattr(head, "s", None)})
            if self.partial_fc is not None:
                d["partial_fc"] = self.partial_fc
        return d
