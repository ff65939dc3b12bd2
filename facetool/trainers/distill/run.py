"""`facetool distill`: load a teacher, build a student, distil on a face store, diagnose.

:func:`distill` checks every input before anything is written (teacher loads, its classifier matches
the store's identities, the student architecture fits the teacher's task, the method can use the
teacher), trains through :func:`facetool.engine.train` with a :class:`DistillMethod`, and writes the
engine's outputs (``model.pt`` is an ordinary facetool checkpoint of the student, so ``eval classify``
/ ``eval lfw`` / ``eval ijbc`` score it) plus ``result.json`` with the diagnostics of
:func:`diagnostics` (the thesis' Tables 4.3, 4.5, 4.6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from facetool.distributed import is_main
from facetool.engine import TrainConfig, seed_everything, train
from facetool.errors import FacetoolError, require_file
from facetool.models.registry import list_models, model_family, resolve_model_name
from facetool.trainers.distill.data import WithUnlabeled, first_per_identity, open_unlabeled
from facetool.trainers.distill.diagnostics import diagnostics
from facetool.trainers.distill.losses import resolve_weights
from facetool.trainers.distill.method import DistillMethod
from facetool.trainers.distill.teacher import Teacher, load_teacher, margin_name

#: registry families (facetool.models.registry) a student comes from: identity classifiers for a classifier
#: teacher, recognition backbones (IR-ResNet, MobileFaceNet; aliases r18..r200, mbf) for an embedding teacher
CLASSIFIER_FAMILY, EMBEDDING_FAMILY = "resnet", "recognition"


# -- the run ---------------------------------------------------------------------------------------
def resolve_student(arch: str, teacher: Teacher | None) -> str:
    """The registered name of ``--student`` (aliases resolved), checked against the teacher's task."""
    name = resolve_model_name(arch, family=(CLASSIFIER_FAMILY, EMBEDDING_FAMILY), option="--student")
    if teacher is not None:
        family = CLASSIFIER_FAMILY if teacher.output_kind == "classification" else EMBEDDING_FAMILY
        want = list_models(family=family)
        if name not in want:
            kind = "an identity classifier" if teacher.output_kind == "classification" else "an embedding model"
            raise FacetoolError(f"teacher {teacher.source} is {kind}; its student must be one of {', '.join(want)}")
    return name


def distill(
    kind: str,
    *,
    store: str | Path,
    student: str,
    cfg: TrainConfig,
    teacher: str | Path | None = None,
    teacher_heads: Sequence[str | Path] = (),
    teacher_loss: str | None = None,
    teacher_scale: float | None = None,
    student_loss: str | None = None,
    embedding_size: int | None = None,
    width: int | None = None,
    input_size: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    temperature: float = 4.0,
    sr_loss: str = "l2",
    hint: tuple[str, str] | None = None,
    unlabeled: str | Path | None = None,
    unlabeled_weight: float = 1.0,
    mixup: float = 0.0,
    transfer: str | Path | None = None,
    labeled_per_identity: int | None = None,
    on_config: Callable[[dict], None] | None = None,
    teacher_arch: str | None = None,
    partial_fc: float | None = None,
    plus: str | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` into a new ``student`` on ``store`` with method ``kind``; returns result.json's dict.
    ``partial_fc``: an embedding student's margin head as :class:`facetool.models.partial_fc.PartialFC` at this
    sample rate (classes split over the torchrun processes; per-rank head files and one merged ``heads.pt``)."""
    from facetool.data.sources import face_source, open_dataset
    from facetool.flops import count_params, flops_summary
    from facetool.io import guard_output, write_json
    from facetool.models import create_model
    from facetool.models.heads import create_head

    weights = resolve_weights(kind, alpha, beta, gamma)
    from facetool.trainers.distill.losses import check_plus

    check_plus(kind, plus)
    cfg.validate()
    store = face_source(require_file(store, "face store"), rec=True)
    vf = getattr(cfg, "val_fraction", None)
    probe = open_dataset(store, None, indices=[], val_fraction=vf)  # a face store or a RecordIO pack
    num_classes, store_size = probe.num_classes, int(probe.image_size[0])
    if teacher_arch is not None and teacher is None:
        raise FacetoolError("--teacher-arch names the architecture of --teacher; give --teacher too")
    if teacher is None and kind != "none":
        raise FacetoolError(f"distillation method {kind} needs --teacher")
    if mixup and unlabeled is None:
        raise FacetoolError("--mixup mixes labeled with unlabeled images: give --unlabeled too")
    if kind == "none" and unlabeled is not None:
        raise FacetoolError("none is the cross-entropy baseline; --unlabeled needs a distillation method (e.g. kd)")
    if labeled_per_identity is not None and labeled_per_identity < 1:
        raise FacetoolError(f"--labeled-per-identity must be >= 1, got {labeled_per_identity}")
    t = load_teacher(teacher, teacher_heads, teacher_loss, teacher_scale, teacher_arch) if teacher is not None else None
    name = resolve_student(student, t)
    uses_classifier = kind in ("srrl", "kd") or unlabeled is not None or (kind != "none" and weights["alpha"] > 0)
    if t is not None and t.output_kind == "classification" and uses_classifier:
        from facetool.tasks import task_of

        task = task_of(t.model)
        if not task.is_identity:
            what = "attribute" + ("s " if len(task.names) > 1 else " ") + ", ".join(task.names)
            raise FacetoolError(
                f"teacher {t.source} predicts {what}, not identities: {kind} distils the teacher's identity classifier"
                + (" (and --alpha its KL)" if kind not in ("srrl", "kd") else "")
                + "; use an identity classifier (train resnet without --task) or a face-recognition model "
                "(train arcface) as the teacher, or fitnet | at | rkd | pkt with --alpha 0 (features only)")
    if t is not None and t.has_logits and uses_classifier and t.num_classes != num_classes:
        raise FacetoolError(f"the teacher's classifier has {t.num_classes} classes but store {store} has {num_classes} "
                            "identities; distil on the identities the teacher was trained on")
    embedding = model_family(name) == EMBEDDING_FAMILY
    if partial_fc is not None:  # the sharded head has no full logits on a rank: only the cross-entropy may use it
        if not embedding:
            raise FacetoolError(f"--partial-fc shards an embedding student's margin head; student {name} is a classifier")
        needs = [what for what, used in (("KL on the student's logits (--alpha > 0)", weights["alpha"] > 0 and kind != "srrl"),
                                         ("--unlabeled (KD on the student's logits)", unlabeled is not None)) if used]
        if needs:
            raise FacetoolError(f"--partial-fc gives no rank the student's logits over every class, which {needs[0]} "
                                "needs: use srrl, none, or fitnet | at | rkd | pkt with --alpha 0")
        if weights["gamma"] <= 0:
            raise FacetoolError("--partial-fc trains the student's margin head through its cross-entropy: --gamma must "
                                "be > 0")
    size = int(input_size or ((t.input_size if t is not None and t.is_torch and t.input_size else None) if embedding
                              else None) or store_size)
    if embedding and size % 16:
        raise FacetoolError(f"--input-size must be a multiple of 16 for {name}, got {size}")
    trans = None
    if transfer is not None:  # read (and refused) before training, not after it
        transfer = face_source(require_file(transfer, "transfer store"), "--transfer")
        trans = (open_dataset(transfer, "train", option="--transfer", size=size),
                 open_dataset(transfer, "test", option="--transfer", size=size))
        if not len(trans[0]) or not len(trans[1]):
            empty = " and ".join(n for n, d in zip(("train", "test"), trans) if not len(d))
            raise FacetoolError(f"--transfer {transfer} has no {empty} images: the linear probe trains on the transfer "
                                "store's train split and scores its test split")
    notes: list[str] = []
    train_ds = open_dataset(store, "train", size=size if size != store_size else None, val_fraction=vf)
    if labeled_per_identity:
        train_ds.indices = first_per_identity(train_ds.labels, train_ds.indices, labeled_per_identity)
    if len(train_ds) == 0:
        raise FacetoolError(f"store {store} has no training images")
    test_ds = open_dataset(store, "test", size=size if size != store_size else None, val_fraction=vf)
    u_ds = open_unlabeled(unlabeled, size, notes) if unlabeled is not None else None
    out = Path(cfg.out)
    for f in (teacher, *teacher_heads):
        if f is not None and out.resolve() in Path(f).resolve().parents:
            raise FacetoolError(f"--out {out} holds the teacher file {f}; the student's files would replace it: "
                                "choose another folder")
    guard_output(out, inputs=(store, teacher, unlabeled, transfer, *teacher_heads),
                 overwrite=cfg.overwrite or cfg.resume, is_dir=True)
    if cfg.resume and (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text()).get("train", {}).get("extra", {})
        if old.get("teacher") not in (None, str(Path(teacher).resolve()) if teacher else None):
            raise FacetoolError(f"cannot resume {out}: it was distilled from {old.get('teacher')}; use another --out")

    seed_everything(cfg.seed)
    kw: dict[str, Any] = {"input_size": size}
    if embedding:
        emb = int(embedding_size or (t.model.embedding_size if t is not None and t.output_kind == "embedding" else 512))
        kw["embedding_size"] = emb
        if width and name.startswith("iresnet"):
            kw["width"] = width
        elif width and width != 64:
            raise FacetoolError(f"--width applies to ResNet and IR-ResNet students, not {name}")
    else:
        kw["num_classes"] = num_classes
        if width:
            kw["width"] = width
    model = create_model(name, **kw)
    head = None
    if embedding:
        if student_loss:
            loss = student_loss
        elif t is not None and t.head is not None:
            loss = margin_name(t.head) if hasattr(t.head, "m1") else "softmax"
        else:
            loss = "arcface"
        th = t.head if t is not None else None
        margins = (th.m1, th.m2, th.m3) if loss == "combined" else None
        if partial_fc is not None:
            from facetool.models.heads import MARGINS
            from facetool.models.partial_fc import PartialFC

            if margins is None and loss not in MARGINS:
                raise FacetoolError(f"--partial-fc needs a margin head: --student-loss arcface or cosface (not {loss})")
            head = PartialFC(kw["embedding_size"], num_classes, partial_fc, margins or loss,
                             float(getattr(th, "s", 64.0)))
        else:
            head = create_head(loss, kw["embedding_size"], num_classes, float(getattr(th, "s", 64.0)), margins=margins)
    probe = torch.stack([train_ds[i]["image"] for i in range(min(8, len(train_ds)))])
    method = DistillMethod(kind, t, model, probe=probe, weights=weights, temperature=temperature, sr_loss=sr_loss,
                           student_head=head, hint=hint, unlabeled_weight=unlabeled_weight if u_ds is not None else 0.0,
                           mixup=mixup, plus=plus)
    notes += method.notes
    cfg.extra = {**cfg.extra, "store": str(store), "teacher": str(Path(teacher).resolve()) if teacher else None,
                 "student": name, "student_kwargs": kw, "unlabeled": str(unlabeled) if unlabeled else None,
                 "labeled_per_identity": labeled_per_identity, "notes": notes}
    if on_config is not None:
        on_config({"method": kind, **{k: v for k, v in weights.items()},
                   "alpha weighs": method.meta()["distill"]["alpha_weighs"],
                   "beta weighs": method.meta()["distill"]["beta_weighs"],
                   "temperature": temperature, **({"sr_loss": sr_loss} if kind == "srrl" else {}),
                   **({"plus": f"{plus} x {method.plus_weight:g}"} if plus else {}),
                   "teacher": str(teacher) if teacher else "-", "student": name, "input size": size,
                   "train images": len(train_ds), **({"unlabeled weight": unlabeled_weight, "mixup": mixup} if u_ds else {}),
                   "notes": list(notes)})
    ds: Dataset = WithUnlabeled(train_ds, u_ds) if u_ds is not None else train_ds
    with method.attached(model):
        final = train(model, method, ds, cfg, test_ds if len(test_ds) else None)
    result: dict[str, Any] = {"method": kind, "store": str(store), "teacher": str(teacher) if teacher else None,
                              "student": dict(model.config), "weights": weights, "metrics": final, "notes": notes,
                              "distill": method.meta()["distill"]}
    if not is_main():
        return result
    device = next(model.parameters()).device
    if partial_fc is not None:  # the diagnostics score every class: the merged head, a plain margin head
        method.use_merged_head(out / "heads.pt", device)
    if len(test_ds):
        result["diagnostics"] = diagnostics(t, model, method, test_ds, cfg.batch_size, device, trans)
    model.cpu()
    result["student"].update(flops_summary(model, size))
    if t is not None and t.is_torch:
        t.to(torch.device("cpu"))
        result["teacher_cost"] = {"params_m": count_params(t.model) / 1e6,
                                  "gflops": flops_summary(t.model, t.input_size or size)["gflops"]}
    write_json(out / "result.json", result)
    return result
