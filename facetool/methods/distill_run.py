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
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from facetool.engine import TrainConfig, seed_everything, train
from facetool.errors import FacetoolError, require_file
from facetool.methods.distill import DistillMethod, Teacher, pooled, resolve_weights, taps

CLASSIFIER_STUDENTS = ("resnet18", "resnet34", "resnet50", "resnet101")
EMBEDDING_STUDENTS = ("mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")
ALIASES = {"mbf": "mobilefacenet", "r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
           "r200": "iresnet200"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


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

    parts = [_head_tensors(torch_load(require_file(p, "teacher head"), "teacher head"), Path(p)) for p in paths]
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
                 scale: float | None = None) -> Teacher:
    """A frozen teacher from a facetool checkpoint, an arcface_torch ``backbone.pth`` or an ONNX file.
    An embedding checkpoint written by ``facetool train arcface`` finds its ``heads.pt`` beside it."""
    from facetool.models import load_model

    p = require_file(path, "teacher")
    try:
        model = load_model(p)
    except FacetoolError as e:
        raise FacetoolError(f"teacher {p} failed to load: {e}") from None
    meta = getattr(model, "meta", {}) or {}
    head_files = [Path(h) for h in heads]
    if not head_files and getattr(model, "task", "") == "embedding" and (p.parent / "heads.pt").is_file() \
            and meta.get("num_classes") and p.suffix != ".onnx":
        head_files = [p.parent / "heads.pt"]
    head = None
    if head_files:
        if getattr(model, "task", "") == "classification":
            raise FacetoolError(f"teacher {p} is a classifier; --teacher-head is only for embedding teachers")
        emb = int(getattr(model, "embedding_size", 0) or (model.config or {}).get("embedding_size", 512))
        head = load_head(head_files, emb, loss, scale, meta)
    return Teacher(model, head, str(p))


# -- data ------------------------------------------------------------------------------------------
class FolderImages(Dataset):
    """Unlabeled aligned face crops from a folder tree (any depth), resized to ``size``."""

    def __init__(self, root: str | Path, size: int, flip: bool = False) -> None:
        self.root = Path(root)
        self.files = sorted(f for f in self.root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if not self.files:
            raise FacetoolError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {self.root}")
        self.size, self.flip = size, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import cv2

        from facetool.data.transforms import normalize
        from facetool.detect.retinaface import read_rgb

        img = read_rgb(self.files[i])
        if img is None:
            raise FacetoolError(f"unreadable image in the unlabeled folder: {self.files[i]}")
        if img.shape[:2] != (self.size, self.size):
            interp = cv2.INTER_AREA if max(img.shape[:2]) > self.size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.size, self.size), interpolation=interp)
        x = normalize(img)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x}


class WithUnlabeled(Dataset):
    """Labeled items with one random unlabeled image each (``u_image``), drawn from torch's global
    generator (restored on resume; reproducible per worker seed with loader workers)."""

    def __init__(self, labeled: Dataset, unlabeled: Dataset) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled

    @property
    def flip(self) -> bool:
        return bool(getattr(self.labeled, "flip", False))

    @flip.setter
    def flip(self, value: bool) -> None:
        for d in (self.labeled, self.unlabeled):
            if hasattr(d, "flip"):
                d.flip = value

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.labeled[i])
        item["u_image"] = self.unlabeled[int(torch.randint(len(self.unlabeled), ()))]["image"]
        return item


def open_unlabeled(path: str | Path, size: int, notes: list[str]) -> Dataset:
    """A face store (all splits, labels ignored) or a folder of aligned crops, at ``size`` px."""
    from facetool.data.dataset import FaceDataset
    from facetool.store import FaceStore

    p = Path(path)
    if p.is_dir():
        ds = FolderImages(p, size)
        notes.append(f"unlabeled: {len(ds)} images from folder {p}, resized to {size} px where they differ")
        return ds
    require_file(p, "unlabeled store")
    with FaceStore(p) as s:
        own = int(s.image_size[0])
    ds = FaceDataset(p, None, size=size if own != size else None)
    if own != size:
        notes.append(f"unlabeled store {p} holds {own} px images; resized to {size} px")
    notes.append(f"unlabeled: {len(ds)} images from {p} (labels ignored)")
    return ds


def first_per_identity(labels: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``indices`` (store order) of every identity."""
    keep, seen = [], {}
    for i in indices:
        c = int(labels[i])
        if seen.get(c, 0) < n:
            keep.append(i)
            seen[c] = seen.get(c, 0) + 1
    return np.asarray(keep, np.int64)


# -- diagnostics -----------------------------------------------------------------------------------
@torch.no_grad()
def extract(teacher: Teacher | None, student: nn.Module, method: DistillMethod, ds: Dataset, batch_size: int,
            device: torch.device) -> dict[str, np.ndarray]:
    """Per image: labels, student logits and own feature, the connected student feature (SRRL),
    teacher logits and feature (eval mode, no flips)."""
    from facetool.data.dataset import make_loader

    student.eval().to(device)
    for m in method.modules().values():
        m.eval().to(device)
    cols: dict[str, list] = {}
    layer = [method.s_fmap] if method.s_fmap else []
    for batch in make_loader(ds, batch_size):
        x = batch["image"].to(device)
        with taps(student, layer) as found:
            out = student(x)
        row = {"label": batch["label"], "s_logits": method.student_logits(out).float()}
        method._s = found
        row["s_h"] = method.student_feature(out).float()
        if teacher is not None:
            t = teacher.run(x)
            row["t_h"] = t["h"].float()
            if t["logits"] is not None:
                row["t_logits"] = t["logits"].float()
            if method.connector is not None:
                row["s_h_connected"] = teacher.head_from_map(method.connector(found[method.s_fmap]))[0].float()
        for k, v in row.items():
            cols.setdefault(k, []).append(v.cpu())
    method._s = {}
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def nmi(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Normalised mutual information between k-means clusters (k = number of identities) of the
    L2-normalised features and the identity labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    k = len(np.unique(labels))
    if k < 2 or len(labels) <= k:
        return float("nan")
    f = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(f)
    return float(normalized_mutual_info_score(labels, pred))


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 (%) of a logistic-regression classifier on frozen, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_f, train_y)
    return 100.0 * float((clf.predict(test_f) == test_y).mean())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = torch.from_numpy(p_logits), torch.from_numpy(q_logits)
    return float(F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), reduction="batchmean", log_target=True))


def _top(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    return 100.0 * float((np.argsort(-logits, 1)[:, :k] == labels[:, None]).any(1).mean())


def diagnostics(teacher: Teacher | None, student: nn.Module, method: DistillMethod, test_ds: Dataset,
                batch_size: int, device: torch.device, transfer: tuple[Dataset, Dataset] | None = None) -> dict:
    """The thesis' distillation diagnostics on the test split, for the student and the teacher:
    top-1/5, KL(teacher || student) at T = 1, CE(student, labels), ||h_T - h_S||^2 (mean over images of
    the squared Euclidean distance; the SRRL student's connected feature, otherwise its own feature
    where the dimensions agree), NMI of k-means clusters, and the linear-probe top-1 on a transfer store."""
    d = extract(teacher, student, method, test_ds, batch_size, device)
    y = d["label"]
    s: dict[str, Any] = {"top1": _top(d["s_logits"], y, 1), "top5": _top(d["s_logits"], y, 5),
                         "ce": float(F.cross_entropy(torch.from_numpy(d["s_logits"]), torch.from_numpy(y))),
                         "nmi": nmi(d["s_h"], y)}
    t: dict[str, Any] = {}
    if teacher is not None:
        t["nmi"] = nmi(d["t_h"], y)
        if "t_logits" in d:
            t.update({"top1": _top(d["t_logits"], y, 1), "top5": _top(d["t_logits"], y, 5),
                      "ce": float(F.cross_entropy(torch.from_numpy(d["t_logits"]), torch.from_numpy(y)))})
            if d["t_logits"].shape == d["s_logits"].shape:
                s["kl_teacher_student"] = _kl(d["t_logits"], d["s_logits"])
        h = d.get("s_h_connected", d["s_h"])
        if h.shape == d["t_h"].shape:
            s["feat_dist"] = float(((d["t_h"] - h) ** 2).sum(1).mean())
            s["feat_dist_of"] = "connected" if "s_h_connected" in d else "own"
    if transfer is not None:
        tr, te = (extract(teacher, student, method, ds, batch_size, device) for ds in transfer)
        s["transfer_top1"] = linear_probe(tr["s_h"], tr["label"], te["s_h"], te["label"])
        if teacher is not None:
            t["transfer_top1"] = linear_probe(tr["t_h"], tr["label"], te["t_h"], te["label"])
    return {"student": s, "teacher": t}


# -- the run ---------------------------------------------------------------------------------------
def resolve_student(arch: str, teacher: Teacher | None) -> str:
    name = ALIASES.get(arch.lower(), arch.lower())
    if name not in CLASSIFIER_STUDENTS + EMBEDDING_STUDENTS:
        raise FacetoolError(f"unknown --student {arch!r}; use one of {', '.join(CLASSIFIER_STUDENTS)} (identity "
                            f"classifiers) or {', '.join(EMBEDDING_STUDENTS)} / mbf, r18..r200 (recognition)")
    if teacher is not None:
        want = CLASSIFIER_STUDENTS if teacher.task == "classification" else EMBEDDING_STUDENTS
        if name not in want:
            kind = "an identity classifier" if teacher.task == "classification" else "an embedding model"
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
) -> dict[str, Any]:
    """Distil ``teacher`` into a new ``student`` on ``store`` with method ``kind``; returns result.json's dict."""
    from facetool.data.dataset import FaceDataset
    from facetool.flops import count_params, flops_summary
    from facetool.io import guard_output, write_json
    from facetool.models import create_model
    from facetool.models.heads import create_head
    from facetool.store import FaceStore

    weights = resolve_weights(kind, alpha, beta, gamma)
    cfg.validate()
    store = require_file(store, "face store")
    with FaceStore(store) as s:
        num_classes, store_size = s.num_classes, int(s.image_size[0])
    if teacher is None and kind != "none":
        raise FacetoolError(f"distillation method {kind} needs --teacher")
    if mixup and unlabeled is None:
        raise FacetoolError("--mixup mixes labeled with unlabeled images: give --unlabeled too")
    if kind == "none" and unlabeled is not None:
        raise FacetoolError("none is the cross-entropy baseline; --unlabeled needs a distillation method (e.g. kd)")
    if labeled_per_identity is not None and labeled_per_identity < 1:
        raise FacetoolError(f"--labeled-per-identity must be >= 1, got {labeled_per_identity}")
    t = load_teacher(teacher, teacher_heads, teacher_loss, teacher_scale) if teacher is not None else None
    name = resolve_student(student, t)
    uses_classifier = kind in ("srrl", "kd") or unlabeled is not None
    if t is not None and t.has_logits and uses_classifier and t.num_classes != num_classes:
        raise FacetoolError(f"the teacher's classifier has {t.num_classes} classes but store {store} has {num_classes} "
                            "identities; distil on the identities the teacher was trained on")
    embedding = name in EMBEDDING_STUDENTS
    size = int(input_size or ((t.input_size if t is not None and t.is_torch and t.input_size else None) if embedding
                              else None) or store_size)
    if embedding and size % 16:
        raise FacetoolError(f"--input-size must be a multiple of 16 for {name}, got {size}")
    if transfer is not None:
        require_file(transfer, "transfer store")
    notes: list[str] = []
    train_ds = FaceDataset(store, "train", size=size if size != store_size else None)
    if labeled_per_identity:
        train_ds.indices = first_per_identity(train_ds.labels, train_ds.indices, labeled_per_identity)
    if len(train_ds) == 0:
        raise FacetoolError(f"store {store} has no training images")
    test_ds = FaceDataset(store, "test", size=size if size != store_size else None)
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
        emb = int(embedding_size or (t.model.embedding_size if t is not None and t.task == "embedding" else 512))
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
            loss = _head_loss(t.head) if hasattr(t.head, "m1") else "softmax"
        else:
            loss = "arcface"
        th = t.head if t is not None else None
        head = create_head(loss, kw["embedding_size"], num_classes, float(getattr(th, "s", 64.0)),
                           margins=(th.m1, th.m2, th.m3) if loss == "combined" else None)
    probe = torch.stack([train_ds[i]["image"] for i in range(min(8, len(train_ds)))])
    method = DistillMethod(kind, t, model, probe=probe, weights=weights, temperature=temperature, sr_loss=sr_loss,
                           student_head=head, hint=hint, unlabeled_weight=unlabeled_weight if u_ds is not None else 0.0,
                           mixup=mixup)
    notes += method.notes
    cfg.extra = {**cfg.extra, "store": str(store), "teacher": str(Path(teacher).resolve()) if teacher else None,
                 "student": name, "student_kwargs": kw, "unlabeled": str(unlabeled) if unlabeled else None,
                 "labeled_per_identity": labeled_per_identity, "notes": notes}
    if on_config is not None:
        on_config({"method": kind, **{k: v for k, v in weights.items()},
                   "alpha weighs": method.meta()["distill"]["alpha_weighs"],
                   "beta weighs": method.meta()["distill"]["beta_weighs"],
                   "temperature": temperature, **({"sr_loss": sr_loss} if kind == "srrl" else {}),
                   "teacher": str(teacher) if teacher else "-", "student": name, "input size": size,
                   "train images": len(train_ds), **({"unlabeled weight": unlabeled_weight, "mixup": mixup} if u_ds else {}),
                   "notes": list(notes)})
    ds: Dataset = WithUnlabeled(train_ds, u_ds) if u_ds is not None else train_ds
    with method.attached(model):
        final = train(model, method, ds, cfg, test_ds if len(test_ds) else None)
    result: dict[str, Any] = {"method": kind, "store": str(store), "teacher": str(teacher) if teacher else None,
                              "student": dict(model.config), "weights": weights, "metrics": final, "notes": notes,
                              "distill": method.meta()["distill"]}
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    device = next(model.parameters()).device
    trans = None
    if transfer is not None:
        trans = (FaceDataset(transfer, "train", size=size), FaceDataset(transfer, "test", size=size))
        if not len(trans[0]) or not len(trans[1]):
            raise FacetoolError(f"transfer store {transfer} needs a train and a test split")
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


def _head_loss(head: nn.Module) -> str:
    from facetool.methods.distill import _margin_name

    return _margin_name(head)


__all__ = ["distill", "load_teacher", "load_head", "diagnostics", "nmi", "linear_probe", "FolderImages",
           "WithUnlabeled", "open_unlabeled", "resolve_student", "first_per_identity"]
