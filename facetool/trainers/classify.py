"""Plain classification on the engine: :class:`ClassificationMethod` (softmax cross-entropy over
identities or attribute heads), :func:`train_on_store` (a registered model trained on a face source,
validated on its test split, ``result.json`` with dense and executed GFLOPs) and
:func:`init_from_checkpoint` (``--init``). AIG, IIG and ABN build on :class:`ClassificationMethod`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from facetool.engine import Method, TrainConfig, seed_everything, train
from facetool.errors import FacetoolError
from facetool.io import write_json


class ClassificationMethod(Method):
    """Softmax cross-entropy over identities; metrics top-1 / top-5 accuracy.

    With an attribute ``task`` (:class:`facetool.tasks.Task`): one softmax cross-entropy per
    attribute head over its known values (-1 ignored), averaged over heads; metrics ``acc_<name>``,
    ``attr_acc`` and, given ``majority`` (the training split's majority codes), the majority-class
    baselines ``base_<name>`` / ``attr_base`` beside them."""

    name = "classify"
    task = None  # facetool.tasks.Task | None (None = identity)
    majority: list[int] | None = None
    class_stats: dict | None = None

    def __init__(self, task=None, majority=None, class_stats=None) -> None:
        self.set_task(task, majority, class_stats)

    def set_task(self, task=None, majority=None, class_stats=None) -> None:
        self.task = None if task is None or task.is_identity else task
        self.majority = list(majority) if majority is not None else None
        self.class_stats = class_stats

    def loss(self, model, batch, out, internals):
        if self.task is not None:
            from facetool.tasks import record_task, task_loss

            cfg = getattr(getattr(model, "module", model), "config", None)
            if isinstance(cfg, dict) and "task" not in cfg:  # a model handed to engine.train directly
                record_task(model, self.task)
            return {"ce": task_loss(out, batch, self.task)}
        return {"ce": nn.functional.cross_entropy(out.float(), batch["label"])}

    def metrics(self, batch, out, internals):
        if self.task is not None:
            from facetool.tasks import task_metrics

            return task_metrics(out, batch, self.task, self.majority)
        return topk_accuracy(out, batch["label"])

    def meta(self) -> dict:
        """The training class balance; the task itself lives in ``model.config["task"]`` only."""
        if self.task is None:
            return {}
        return {"class_stats": self.class_stats or {}}

    def log_keys(self) -> tuple[str, ...]:
        return (*super().log_keys(), "val_attr_acc", "val_attr_base", "val_acc*")


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": float(hit[:, : min(k, k_max)].any(1).float().mean()) for k in ks}


def init_from_checkpoint(model: nn.Module, path: str | Path, notes: list[str] | None = None) -> tuple[int, int]:
    """Copy the tensors of checkpoint ``path`` into ``model`` where names and shapes match; returns
    (copied, left) counts. A checkpoint of which less than half of the tensors fit (another
    architecture) is an error. When only part of them is copied, ``notes`` gets one line saying how many
    and which were not (the rest of the model keeps its fresh initialisation)."""
    from facetool.models.checkpoint import read_checkpoint

    sd = read_checkpoint(Path(path))["state_dict"]
    own = model.state_dict()
    match = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if len(match) * 2 < len(sd):
        raise FacetoolError(f"--init {path}: only {len(match)} of its {len(sd)} tensors fit this model "
                            "(another architecture or width?)")
    model.load_state_dict(match, strict=False)
    skipped = [f"{k} ({'x'.join(map(str, v.shape))} here {'x'.join(map(str, own[k].shape))})" if k in own else
               f"{k} (not in this model)" for k, v in sd.items() if k not in match]
    fresh = len(own) - len(match)
    if notes is not None and (skipped or fresh):
        few = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        notes.append(f"--init {path}: copied {len(match)} of its {len(sd)} tensors"
                     + (f"; not copied: {few}" if skipped else "")
                     + f"; {fresh} of the model's {len(own)} tensors keep their fresh initialisation")
    return len(match), fresh


def train_on_store(store: str | Path, model_name: str, method_factory: Callable[[nn.Module], Method],
                   cfg: TrainConfig, *, input_size: int | None = None, attributes: Sequence[str] = (),
                   model_kwargs: dict | None = None, task: Any = None, init: str | Path | None = None) -> dict[str, Any]:
    """Build train/test datasets of a face store and a registered model, train it with the method
    returned by ``method_factory(model)`` (validating on the store's test split each epoch), and write
    ``result.json`` (final metrics, parameters and the method's :meth:`~facetool.engine.Method.summary`:
    dense and executed GFLOPs). Returns that dict.

    ``task`` (:class:`facetool.tasks.Task`, default identity): an attribute task sizes the model's
    output to the task (concatenated per-attribute logits), records it in ``model.config["task"]``,
    and hands it with the training split's majority classes to the method (``set_task``).

    ``init``: a checkpoint whose weights initialise the model where names and shapes match (the
    classifier of another task or class count is left at its initialisation)."""
    from facetool.data.sources import open_dataset
    from facetool.distributed import is_main
    from facetool.flops import count_params
    from facetool.models.registry import create_model

    cfg.validate()
    if input_size is not None and input_size < 1:
        raise FacetoolError(f"--input-size must be a positive number of pixels, got {input_size}")
    stats = None
    if task is not None and not task.is_identity:
        from facetool.tasks import class_stats, record_task

        attributes = list(dict.fromkeys([*task.names, *attributes]))
        stats = class_stats(store, task, "train")
    vf = getattr(cfg, "val_fraction", None)
    train_ds = open_dataset(store, "train", flip=cfg.flip, attributes=attributes, size=input_size, val_fraction=vf)
    size = input_size or int(train_ds.image_size[0])
    if len(train_ds) == 0:
        raise FacetoolError(f"store {store} has no training images")
    val_ds = open_dataset(store, "test", attributes=attributes, size=input_size, val_fraction=vf)
    seed_everything(cfg.seed)
    ncls = train_ds.num_classes if stats is None else task.num_outputs
    model = create_model(model_name, num_classes=ncls, input_size=size, **(model_kwargs or {}))
    if stats is not None:
        record_task(model, task)
    if init is not None:
        notes: list[str] = []
        init_from_checkpoint(model, init, notes)
        if cfg.verbose and is_main():
            from facetool.console import err_console

            for n in notes:
                err_console.print(f"note: {n}", highlight=False, soft_wrap=True, markup=False)
    method = method_factory(model)
    if stats is not None:
        if not hasattr(method, "set_task"):
            raise FacetoolError(f"method {method.name} trains identities only; use --task identity")
        method.set_task(task, [stats[n]["majority_code"] for n in task.names], stats)
    final = train(model, method, train_ds, cfg, val_ds if len(val_ds) else None)
    result: dict[str, Any] = {"store": str(store), "model": dict(model.config), "method": method.name,
                              "metrics": final, "params": count_params(model)}
    if stats is not None:
        result.update(task=task.to_json(), class_stats=stats)
    if is_main():
        model.cpu()
        result.update(method.summary(model, final))
        write_json(Path(cfg.out) / "result.json", result)
    return result


__all__ = ["ClassificationMethod", "topk_accuracy", "train_on_store", "init_from_checkpoint"]
