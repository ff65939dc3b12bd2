"""ArcFace / CosFace / softmax training of recognition backbones on a face store.

:class:`ArcFaceMethod` is the engine plugin: its margin head (:mod:`facetool.models.heads`) is an
extra trainable module, the loss is cross-entropy on the margin logits, the per-batch metric is the
top-1 of the head's plain cosine logits. At the end of each epoch it reports how well embeddings
separate genuine from impostor pairs of the store's test split (:func:`pair_stats`) and, given
``.bin`` packs (LFW, CFP-FP, AgeDB-30), their 10-fold verification accuracy.

:func:`train_arcface` is the whole recipe: store -> engine -> ``model.pt`` (facetool checkpoint of
the backbone) and ``backbone.pth`` (plain state_dict, arcface_torch-compatible for IR-ResNets).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.engine import Method, TrainConfig, seed_everything, train
from facetool.errors import FacetoolError
from facetool.models.heads import MARGINS, create_head

#: the registry family (facetool.models.registry) --network names; arcface_torch's short names (r50, mbf)
#: are its aliases
NETWORK_FAMILY = "recognition"
LOSSES = ("arcface", "cosface", "softmax")


@torch.no_grad()
def embed_dataset(model: nn.Module, ds, batch_size: int = 128, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings and labels of a :class:`FaceDataset` (eval mode, no flips)."""
    from facetool.data.dataset import make_loader

    model.eval()
    feats, labels = [], []
    for batch in make_loader(ds, batch_size):
        feats.append(F.normalize(model(batch["image"].to(device)).float(), dim=1).cpu())
        labels.append(batch["label"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def pair_stats(feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cosine similarities of all pairs: mean genuine / impostor, their separation
    d' = (mu_g - mu_i) / sqrt((var_g + var_i) / 2) and the ROC AUC."""
    from sklearn.metrics import roc_auc_score

    sim = feats @ feats.T
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    s = sim[iu]
    if same.all() or not same.any():
        raise FacetoolError("pair statistics need at least two identities with two images each")
    g, i = s[same], s[~same]
    dprime = (g.mean() - i.mean()) / np.sqrt((g.var() + i.var()) / 2 + 1e-12)
    return {"genuine_cos": float(g.mean()), "impostor_cos": float(i.mean()), "dprime": float(dprime),
            "auc": float(roc_auc_score(same, s))}


class ArcFaceMethod(Method):
    """Margin-softmax training of an embedding model (ArcFace, CosFace or plain softmax)."""

    name = "arcface"

    def __init__(self, num_classes: int, embedding_size: int, loss: str = "arcface", s: float = 64.0,
                 margins: tuple[float, float, float] | None = None, pair_ds=None, val_bins: Sequence[str | Path] = (),
                 eval_batch_size: int = 128, partial_fc: float | None = None) -> None:
        if loss not in LOSSES:
            raise FacetoolError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.loss_name = loss
        self.margins = tuple(margins) if margins is not None else MARGINS.get(loss)
        self.s = s
        self.num_classes = num_classes
        self.partial_fc = partial_fc
        if partial_fc is not None:  # the class centres split over the ranks (facetool.models.partial_fc)
            from facetool.models.partial_fc import PartialFC

            if self.margins is None:
                raise FacetoolError("--partial-fc needs a margin head: --loss arcface or cosface (not softmax)")
            self.head = PartialFC(embedding_size, num_classes, partial_fc, self.margins, s)
        else:
            self.head = create_head("combined" if margins is not None and loss != "softmax" else loss,
                                    embedding_size, num_classes, s, margins)
        self.pair_ds = pair_ds
        self.val_bins = [Path(b) for b in val_bins]
        self._packs: dict[Path, Any] = {}
        self.eval_batch_size = eval_batch_size

    def modules(self) -> dict[str, nn.Module]:
        return {} if self.partial_fc is not None else {"head": self.head}

    def sharded_modules(self) -> dict[str, nn.Module]:
        """With PartialFC the head holds this rank's classes: its own optimizer state, saved per rank."""
        return {"head": self.head} if self.partial_fc is not None else {}

    def merge_shards(self, parts):
        """heads.pt gets one head of all classes, as a MarginHead's state_dict (``weight`` (C, D))."""
        if self.partial_fc is None:
            return {}
        from facetool.models.partial_fc import PartialFC

        return {"head": PartialFC.merge([p["head"] for p in parts])}

    def loss(self, model, batch, out, internals):
        if self.partial_fc is not None:  # the loss itself (distributed cross-entropy over every rank's batch)
            return {"ce": self.head(out, batch["label"])}
        return {"ce": F.cross_entropy(self.head(out, batch["label"]), batch["label"])}

    def metrics(self, batch, out, internals):
        if self.partial_fc is not None:  # top-1 over the whole batch among the centres the step used
            return {"top1": self.head.last_top1}
        with torch.no_grad():
            pred = self.head.cosine(out).argmax(1)
        return {"top1": float((pred == batch["label"]).float().mean())}

    def evaluate(self, model, epoch):
        device = next(model.parameters()).device
        row: dict[str, float] = {}
        if self.pair_ds is not None:
            feats, labels = embed_dataset(model, self.pair_ds, self.eval_batch_size, device)
            row.update({f"pairs_{k}": v for k, v in pair_stats(feats, labels).items()})
        for path in self.val_bins:
            if path not in self._packs:  # decode each pack once per run
                from facetool.eval.verification import load_bin

                self._packs[path] = load_bin(path)
            row.update(_verify_bin(model, path, self._packs[path], self.eval_batch_size, device))
        return row

    def log_keys(self) -> tuple[str, ...]:
        return (*super().log_keys(), "lfw*")  # the LFW pack's verification accuracy, when validated on one

    def meta(self) -> dict:
        return {"loss": self.loss_name, "margins": list(self.margins) if self.margins else None, "s": self.s,
                "num_classes": self.num_classes, **({"partial_fc": self.partial_fc} if self.partial_fc else {})}


def _verify_bin(model: nn.Module, path: Path, pack, batch_size: int, device: torch.device) -> dict[str, float]:
    """arcface_torch's 10-fold verification accuracy on a ``.bin`` pack (facetool.eval.verification)."""
    from facetool.eval.verification import evaluate_pairs

    images, issame = pack  # 112-px crops; evaluate_pairs resizes them to the model's own input size
    res = evaluate_pairs(model, images, issame, batch_size=batch_size, device=str(device))
    model.eval()
    return {f"{path.stem}_acc": float(res["accuracy"]), f"{path.stem}_acc_std": float(res["std"])}


def resolve_network(network: str, family: str = NETWORK_FAMILY) -> str:
    """The registered recognition backbone ``--network`` names (``r50`` -> ``iresnet50``, ``mbf`` ->
    ``mobilefacenet``) of ``family``; anything else is a FacetoolError listing the names."""
    from facetool.models.registry import resolve_model_name

    return resolve_model_name(network, family=family, option="--network")


def parse_margins(text: str | None) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        m = tuple(float(v) for v in text.split(","))
    except ValueError:
        m = ()
    if len(m) != 3:
        raise FacetoolError(f"--margins needs three numbers m1,m2,m3 (e.g. 1.0,0.5,0.0), got {text!r}")
    return m  # type: ignore[return-value]


def train_arcface(
    store: str | Path,
    cfg: TrainConfig,
    *,
    network: str = "r50",
    loss: str = "arcface",
    embedding_size: int = 512,
    input_size: int = 112,
    s: float = 64.0,
    margins: tuple[float, float, float] | None = None,
    val_bins: Sequence[str | Path] = (),
    pair_eval: bool = True,
    max_pair_images: int = 2000,
    model_kwargs: dict[str, Any] | None = None,
    family: str = NETWORK_FAMILY,
    method_factory: Callable[..., ArcFaceMethod] | None = None,
    partial_fc: float | None = None,
    prepare_model: Callable[[nn.Module], Any] | None = None,
) -> dict[str, float]:
    """Train ``network`` (a model of the registry ``family``) with a margin head on ``store``'s train
    split; the test split (if any) is the validation set and gives the pair statistics. Writes the engine
    outputs plus ``backbone.pth`` and ``result.json`` (final metrics, GFLOPs, parameters: what a recipe's summary
    reads). ``partial_fc``: the head's classes split over the ranks and sampled at this rate
    (:class:`facetool.models.partial_fc.PartialFC`; per-rank head files, one merged ``heads.pt``).
    ``method_factory(model, **kw)`` builds the method from the model and
    :class:`ArcFaceMethod`'s keyword arguments (default: an ArcFaceMethod), so that methods built on it
    (``trainers.condface``) share this recipe. ``prepare_model(model)`` runs once, right after the model is built
    and before anything reads it: ``--init`` weights (CondFace) or the frozen FAN (FAN-Face) go in there."""
    from facetool.data.sources import open_dataset
    from facetool.distributed import is_main
    from facetool.errors import require_file
    from facetool.io import torch_save, write_json
    from facetool.models import create_model

    cfg.validate()
    if not (s > 0 and math.isfinite(s)):
        raise FacetoolError(f"--scale must be a positive number (arcface_torch: 64), got {s}")
    if embedding_size < 1:
        raise FacetoolError(f"--embedding-size must be >= 1, got {embedding_size}")
    if input_size < 1:
        raise FacetoolError(f"--input-size must be a positive number of pixels, got {input_size}")
    if margins is not None and not all(math.isfinite(m) for m in margins):
        raise FacetoolError(f"--margins must be finite numbers, got {margins}")
    require_file(store, "face store")
    for b in val_bins:
        require_file(b, "verification pack")
    name = resolve_network(network, family)
    seed_everything(cfg.seed)  # --seed decides the backbone's and the margin head's initial weights
    try:
        model = create_model(name, embedding_size=embedding_size, input_size=input_size, **(model_kwargs or {}))
    except TypeError as e:  # a registry model that is not a recognition backbone
        raise FacetoolError(f"network {network!r} cannot be built as a recognition backbone ({e}); "
                            "use r18/r34/r50/r100/r200/mbf") from None
    if prepare_model is not None:
        prepare_model(model)
    if getattr(model, "output_kind", None) != "embedding":
        raise FacetoolError(f"network {network!r} is not an embedding model; use r18/r34/r50/r100/r200/mbf")
    vf = getattr(cfg, "val_fraction", None)
    train_ds = open_dataset(store, "train", size=input_size, val_fraction=vf)
    test_ds = open_dataset(store, "test", size=input_size, val_fraction=vf)
    val_ds = test_ds if len(test_ds) else None
    pair_ds = None
    idx = test_ds.indices
    if len(idx) > max_pair_images:
        idx = np.sort(np.random.default_rng(0).choice(idx, max_pair_images, replace=False))
    counts = np.bincount(test_ds.labels[idx]) if len(idx) else np.zeros(0, int)
    if pair_eval and (counts > 0).sum() >= 2 and (counts >= 2).any():  # both genuine and impostor pairs
        pair_ds = open_dataset(store, None, size=input_size, indices=idx)
    kw = dict(num_classes=train_ds.num_classes, embedding_size=embedding_size, loss=loss, s=s, margins=margins,
              pair_ds=pair_ds, val_bins=val_bins, eval_batch_size=cfg.batch_size)
    if partial_fc is not None:  # PartialFC at this sample rate (only then passed: method factories need not know it)
        kw["partial_fc"] = partial_fc
    method = method_factory(model, **kw) if method_factory is not None else ArcFaceMethod(**kw)
    cfg.extra = {**cfg.extra, "store": str(store), "network": name, "loss": loss}
    result = train(model, method, train_ds, cfg, val_ds)
    if is_main():
        torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(cfg.out) / "backbone.pth")
        # result.json as the classification trainers write it: the numbers a recipe's summary table reads
        model.cpu()
        write_json(Path(cfg.out) / "result.json", {"store": str(store), "model": dict(model.config),
                                                   "method": method.name, "metrics": result,
                                                   **method.summary(model, result)})
    return result
