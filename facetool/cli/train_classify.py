"""`facetool train resnet|aig|iig`: identity classifiers, ConvNet-AIG and ConvNet-IIG on a face store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options
from facetool.errors import FacetoolError

#: per command: the registry family its --arch comes from and the prefix of the family's names
#: (the user names the backbone: --arch resnet50 trains aig_resnet50)
FAMILIES = {"resnet": ("resnet", ""), "aig": ("aig", "aig_"), "iig": ("aig", "aig_"), "abn": ("abn", "abn_")}
#: --arch help (static: --help must not import torch; tests/test_cli_options.py checks it against the registry)
ARCH_HELP = "resnet18 | resnet34 | resnet50 | resnet101."
ABN_ARCH_HELP = "Backbone: resnet18 | resnet34 | resnet50 | resnet101 | iresnet18 | iresnet34 | iresnet50 | iresnet100 " \
                "(r18 | r34 | r50 | r100 are aliases of the IR-ResNets)."
#: per-command defaults of the training options that may differ by method (facetool.cli.options.PER_METHOD)
DEFAULTS = {"epochs": 30, "batch_size": 150, "lr": 0.1, "schedule": "cosine"}


def _model_name(kind: str, arch: str) -> str:
    """The registered model ``train KIND --arch ARCH`` builds (resnet50 -> aig_resnet50 for aig; aliases
    resolved); an unknown name is an error listing the family's names from the registry."""
    from facetool.models.registry import resolve_model_name

    family, prefix = FAMILIES[kind]
    return resolve_model_name(arch, family=family, prefix=prefix, option="--arch")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FacetoolError(f"{option} needs integers separated by commas, got {text!r}") from None


def _out(kind: str, name: str, out: Optional[Path], inputs: tuple, train: TrainOptions) -> Path:
    """The run folder: --out, or runs/<kind>-<backbone>-<n> (the next free n); guarded before anything runs.
    ``inputs[0]`` is the face source: every file of a pack (``.rec``, ``.idx``, ``property``) is an input."""
    from facetool.data.sources import input_paths
    from facetool.io import guard_run_folder

    inputs = (*input_paths(inputs[0]), *inputs[1:])
    arch = name.removeprefix(FAMILIES[kind][1])
    return guard_run_folder(out, f"{kind}-{arch}", inputs=inputs, overwrite=train.overwrite, resume=train.resume)


def _show(title: str, result: dict) -> None:
    m = result["metrics"]
    keys = ["epoch", "train_loss", "train_top1", "val_top1", "val_top5", "train_attr_acc", "train_attr_base",
            "val_attr_acc", "val_attr_base", "val_att_top1", "val_att_attr_acc", "val_exec_rate", "val_exec_rate_free"]
    if "task" not in result:
        keys += [k for k in m if k.startswith("val_acc_")]
    rows = {k: m[k] for k in keys if k in m}
    rows.update({k: result[k] for k in ("gflops", "exec_gflops", "params_m") if k in result})
    console.print(dict_table(title, rows, "metric"))
    if "task" in result:
        show_task_table(result["task"], result.get("class_stats", {}), m)


def show_task_table(task: dict, stats: dict, metrics: dict) -> None:
    """Per attribute: accuracy beside the majority-class baseline, and the training class balance."""
    from facetool.cli.common import records_table

    rows = []
    for n in task["names"]:
        st = stats.get(n, {})
        counts = st.get("counts", {})
        cells = {"attribute": n,
                 "val acc %": _pct(metrics.get(f"val_acc_{n}")), "majority %": _pct(metrics.get(f"val_base_{n}")),
                 "train acc %": _pct(metrics.get(f"train_acc_{n}")),
                 "majority value": str(st.get("majority", "-")),
                 "train share %": _pct(st.get("majority_share")),
                 "train counts": "/".join(str(v) for v in counts.values()) if isinstance(counts, dict) else "-"}
        rows.append(cells)
    headers = ["attribute", "val acc %", "majority %", "train acc %", "majority value", "train share %", "train counts"]
    console.print(records_table("attributes: accuracy vs the majority-class baseline, class balance (train)", rows,
                                headers))


def _pct(v) -> str:
    return "-" if v is None else f"{100.0 * float(v):.1f}"


TASK_HELP = "identity | attribute:NAME | attributes (all attributes of the store) | attributes:A,B,..."


def task_option():
    return typer.Option("identity", "--task", help=f"What to predict: {TASK_HELP}.")


def register(app: typer.Typer) -> None:
    def run(kind: str, store: Path, out: Optional[Path], arch: str, train: TrainOptions, factory, *,
            input_size: Optional[int], width: int, attributes=(), gate_hidden: int = 16, task: str = "identity",
            mechanism: str = "residual", init: Optional[Path] = None, att_channels: Optional[int] = None) -> None:
        from facetool.engine import TrainConfig
        from facetool.trainers.classify import train_on_store
        from facetool.tasks import resolve_task

        name = _model_name(kind, arch)
        out = _out(kind, name, out, (store, init), train)
        t = resolve_task(task, store)
        if kind == "abn":
            kw = {"width": width, "heads": list(t.classes), "mechanism": mechanism}
            from facetool.models.abn import att_channels_option

            k = att_channels_option(att_channels, t.num_outputs)
            if k is not None:
                kw["att_channels"] = k
        else:
            kw = {"width": width} | ({"gate_hidden": gate_hidden} if kind != "resnet" else {})
        cfg = TrainConfig.from_options(train, out=out)
        result = train_on_store(store, name, factory, cfg, input_size=input_size, attributes=attributes,
                                model_kwargs=kw, task=t, init=init)
        from facetool.distributed import is_main

        if is_main():
            _show(f"train {kind} ({name}) -> {out}", result)

    store_o = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5); train split trains, test split validates. [env FACETOOL_STORE]")
    out_o = typer.Option(None, "--out", help="Run folder: model.pt, last.pt (resume), metrics.csv/jsonl, result.json "
                                             "(default: runs/<command>-<arch>-<n>, the next free n).")
    arch_o = typer.Option("resnet50", "--arch", help=ARCH_HELP)
    size_o = typer.Option(None, "--input-size", help="Network input size (default: the store's image size).")
    width_o = typer.Option(64, "--width", help="Base width (64 = standard ResNet; 16/32 for CPU runs).")
    task_o = task_option()

    @app.command("resnet")
    @guarded
    @training_options(**DEFAULTS)
    def resnet(store: Path = store_o, out: Optional[Path] = out_o, arch: str = arch_o, input_size: Optional[int] = size_o,
               width: int = width_o, task: str = task_o,
               init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint whose weights initialise the model where names and shapes match (e.g. an identity model for a gender model)."),
               train: TrainOptions = None) -> None:
        """Train a ResNet classifier (softmax cross-entropy) of identities or attributes (--task).

        --task attribute:gender trains one softmax head; --task attributes one head per attribute of the
        store (concatenated logits); unknown values (-1) are ignored; accuracies are reported beside the
        majority-class baseline.

        Example: facetool train resnet --store data/faces.h5 --arch resnet50 --epochs 30 --out runs/resnet50
        """
        from facetool.trainers.classify import ClassificationMethod

        run("resnet", store, out, arch, train, lambda model: ClassificationMethod(), input_size=input_size, width=width,
            task=task, init=init)

    @app.command("aig")
    @guarded
    @training_options(**DEFAULTS)
    def aig(store: Path = store_o, out: Optional[Path] = out_o, arch: str = arch_o, input_size: Optional[int] = size_o,
            width: int = width_o,
            target: float = typer.Option(0.4, "--target", help="Target execution rate t in [0, 1] of the free blocks."),
            target_schedule: str = typer.Option("", "--target-schedule",
                                                help="Explicit per-block targets '1,1,0.4,...' (one per gated block)."),
            target_weight: float = typer.Option(1.0, "--target-weight", help="Weight of L_target."),
            gate_hidden: int = typer.Option(16, "--gate-hidden", help="Hidden channels of each gate."),
            task: str = task_o, train: TrainOptions = None) -> None:
        """Train ConvNet-AIG: a gate per residual block, CE + L_target (blocks really skipped at inference).

        Default targets: the middle blocks at --target; ResNet-101 pins the first 7 and last 3 blocks to 1,
        shallower nets round(7L/33) and round(3L/33) (ResNet-50: 3 and 1).

        Example: facetool train aig --store data/faces.h5 --arch resnet50 --target 0.4 --epochs 30 --out runs/aig
        """
        from facetool.trainers.aig import AIGMethod, parse_target_schedule
        from facetool.trainers.aig import target_schedule as default_schedule

        def factory(model):
            L = model.num_gates
            ts = parse_target_schedule(target_schedule, L) if target_schedule else default_schedule(L, target)
            return AIGMethod(ts, target_weight)

        run("aig", store, out, arch, train, factory, input_size=input_size, width=width, gate_hidden=gate_hidden,
            task=task)

    @app.command("iig")
    @guarded
    @training_options(**DEFAULTS)
    def iig(store: Path = store_o, out: Optional[Path] = out_o, arch: str = arch_o, input_size: Optional[int] = size_o,
            width: int = width_o,
            feature: str = typer.Option(..., "--feature", help="Attribute(s) of the store, comma-separated: gender[,age]."),
            masks: Optional[Path] = typer.Option(None, "--masks",
                                                 help='JSON {"gender": {"female": [3,5,7], "male": [4,6,8]}} (0-based gated blocks).'),
            mask_style: str = typer.Option("alternating", "--mask-style", help="alternating | contiguous (without --masks)."),
            per_value: str = typer.Option("3", "--blocks-per-value", help="Gated blocks per attribute value (without --masks): one number, or one per feature, e.g. 3,4 for gender,age."),
            with_target: bool = typer.Option(False, "--with-target", help="Also add L_target (AIG target schedule)."),
            target: float = typer.Option(0.6, "--target", help="Target rate for --with-target."),
            iig_weight: float = typer.Option(1.0, "--iig-weight", help="Weight of L_IIG."),
            gate_hidden: int = typer.Option(16, "--gate-hidden"),
            train: TrainOptions = None) -> None:
        """Train ConvNet-IIG: each attribute value owns disjoint gated blocks; CE + L_IIG (+ L_target).

        The masks and the attribute vocabulary go into the checkpoint meta
        (facetool annotate --from-model uses them).

        Example: facetool train iig --store data/faces.h5 --arch resnet50 --feature gender --out runs/iig
        """
        from facetool.trainers.aig import target_schedule as default_schedule
        from facetool.trainers.iig import IIGMethod, load_masks, make_masks
        from facetool.store import FaceStore

        feats = [f.strip() for f in feature.split(",") if f.strip()]
        if not feats:
            raise FacetoolError("--feature needs at least one attribute name")
        out = _out("iig", _model_name("iig", arch), out, (store, masks), train)
        from facetool.data.sources import face_source

        with FaceStore(face_source(store)) as s:  # a pack (no attributes): one line pointing to prepare rec
            vocab = {f: s.attribute(f)[1] for f in feats}
        given = load_masks(masks) if masks is not None else None
        if given is not None and set(given) != set(feats):
            raise FacetoolError(f"--masks covers {', '.join(given) or 'nothing'} but --feature asks for {', '.join(feats)}")

        def factory(model):
            L = model.num_gates
            m = {f: given[f] for f in feats} if given is not None else make_masks(vocab, L, mask_style, _int_list(per_value, '--blocks-per-value'))
            return IIGMethod(m, vocab, L, default_schedule(L, target) if with_target else None, iig_weight)

        run("iig", store, out, arch, train, factory, input_size=input_size, width=width, attributes=feats,
            gate_hidden=gate_hidden)

    @app.command("abn")
    @guarded
    @training_options(**DEFAULTS)
    def abn(store: Path = store_o, out: Optional[Path] = out_o,
            arch: str = typer.Option("resnet50", "--arch", help=ABN_ARCH_HELP),
            input_size: Optional[int] = size_o, width: int = width_o,
            mechanism: str = typer.Option("residual", "--mechanism",
                                          help="residual: perception sees (1+M)*g (paper Eq. 2); multiply: M*g (Eq. 1)."),
            attention_weight: float = typer.Option(1.0, "--attention-weight", help="Weight of CE(attention branch)."),
            att_channels: Optional[int] = typer.Option(
                None, "--att-channels", show_default=False,
                help="Width K of the attention branch's ReLU bottleneck. Default: max(number of outputs, 16), which "
                     "keeps a binary attribute's bottleneck from dying; 0 = the number of outputs, as in the paper "
                     "(and 0.2.1's default: a 0.2.1 run started without this option resumes with 0)."),
            task: str = task_o, train: TrainOptions = None) -> None:
        """Train an Attention Branch Network: loss = CE(attention branch) + CE(perception branch).

        Any input size (adaptive pooling). With --task attributes there is one attention map and one
        perception output per attribute, computed in one batched pass. The maps are the model's
        "attention" internal (facetool dissect attention shows them).

        Example: facetool train abn --store data/celeba.h5 --arch resnet101 --task attributes --epochs 10 --lr 0.01 --out runs/abn
        """
        from facetool.trainers.abn import ABNMethod
        from facetool.models.abn import MECHANISMS

        if mechanism not in MECHANISMS:
            raise FacetoolError(f"unknown --mechanism {mechanism!r}; use one of {', '.join(MECHANISMS)}")
        run("abn", store, out, arch, train, lambda model: ABNMethod(attention_weight), input_size=input_size,
            width=width, task=task, mechanism=mechanism, att_channels=att_channels)
