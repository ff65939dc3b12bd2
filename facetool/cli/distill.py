"""`facetool distill METHOD`: knowledge distillation (SRRL and the KD/FitNet/AT/RKD/PKT baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options

#: --student help (static: --help must not import torch; tests/test_cli_options.py checks it against the registry)
STUDENT_HELP = ("resnet18 | resnet34 | resnet50 | resnet101 (classifier teacher), or iresnet18 | iresnet34 | iresnet50 | "
                "iresnet100 | iresnet200 | mobilefacenet (embedding teacher; aliases r18 | r34 | r50 | r100 | r200 | "
                "mbf).")
METHOD_HELP = "srrl | kd | fitnet | at | rkd | pkt | none (none = the same student trained with cross-entropy only)."


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @guarded
    @training_options(epochs=30, batch_size=128, lr=0.1, schedule="cosine")
    def distill_cmd(
        method: str = typer.Argument(..., help=METHOD_HELP),
        teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher: facetool checkpoint, arcface_torch backbone.pth or ONNX model (optional for none)."),
        student: str = typer.Option(..., "--student", help=STUDENT_HELP),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5): train split trains, test split validates and is diagnosed. [env FACETOOL_STORE]"),
        out: Path = typer.Option(..., "--out", help="Run folder: model.pt (the student), heads.pt, last.pt (resume), metrics, result.json."),
        teacher_arch: Optional[str] = arch_option("--teacher-arch", of="--teacher"),
        teacher_head: list[Path] = typer.Option([], "--teacher-head", help="Classifier of an embedding teacher (facetool heads.pt, arcface_torch softmax weight); repeat for model-parallel shards."),
        teacher_loss: Optional[str] = typer.Option(None, "--teacher-loss", help="arcface | cosface | softmax: the head's kind (default: from the checkpoint, else arcface)."),
        teacher_scale: Optional[float] = typer.Option(None, "--teacher-scale", help="Logit scale s of a margin head (default: from the checkpoint, else 64)."),
        student_loss: Optional[str] = typer.Option(None, "--student-loss", help="Embedding students: their own head (arcface | cosface | softmax; default: the teacher's)."),
        partial_fc: Optional[float] = typer.Option(None, "--partial-fc", help="Embedding students: PartialFC, their margin head's classes split over the torchrun processes, this share of each rank's centres sampled per step (all positives kept; 1 = all); the student's cross-entropy only (not with KL on its logits)."),
        embedding_size: Optional[int] = typer.Option(None, "--embedding-size", help="Embedding students: dimension (default: the teacher's)."),
        width: Optional[int] = typer.Option(None, "--width", help="Student base width (ResNet / IR-ResNet; default 64)."),
        input_size: Optional[int] = typer.Option(None, "--input-size", help="Student input size (default: the store's; embedding students the teacher's)."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="SRRL: weight of L_FM (1); others: weight of KL at T (kd 0.9, others 0)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="SRRL: weight of L_SR (1); fitnet 100, at 1000, rkd 1, pkt 30000."),
        gamma: Optional[float] = typer.Option(None, "--gamma", help="Weight of the student's cross-entropy (kd 0.1, others 1)."),
        temperature: float = typer.Option(4.0, "--temperature", help="KD temperature T (KL times T^2)."),
        sr_loss: str = typer.Option("l2", "--sr-loss", help="SRRL: l2 (Eq. 4.8) or ce (Eq. 4.4)."),
        hint: Optional[str] = typer.Option(None, "--hint", help="FitNet: TEACHER_STAGE,STUDENT_STAGE (default: the second named stage of each)."),
        unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="Unlabeled images: a face store (labels ignored) or a folder of aligned crops."),
        unlabeled_weight: float = typer.Option(1.0, "--unlabeled-weight", help="lambda: weight of KD on the unlabeled (or mixed) images."),
        mixup: float = typer.Option(0.0, "--mixup", help="Mix each labeled image with an unlabeled one, lambda ~ Beta(A, A) (0 = off)."),
        transfer: Optional[Path] = typer.Option(None, "--transfer", help="Another store: linear-probe top-1 of the frozen student (and teacher) features."),
        labeled_per_identity: Optional[int] = typer.Option(None, "--labeled-per-identity", help="Use only the first N training images of each identity."),
        plus: Optional[str] = typer.Option(None, "--plus", help="SRRL only: add kd (0.9 x KL at T) or at (1000 x AT) to "
                                           "the SRRL loss, the thesis's Table 4.8 KD+Ours / AT+Ours."),
        train: TrainOptions = None,
    ) -> None:
        """Distil a frozen teacher into a student on the training engine (SRRL or a baseline).

        Example: facetool distill srrl --teacher runs/r101/model.pt --student resnet18 --store imdb.h5 --out runs/srrl
        """
        from facetool.engine import TrainConfig
        from facetool.errors import FacetoolError
        from facetool.trainers.distill import METHODS
        from facetool.trainers.distill import distill

        from facetool.data.sources import input_paths
        from facetool.io import guard_output

        # the run folder is checked before anything else (the library checks it again with the teacher)
        guard_output(out, inputs=(*input_paths(store), teacher, unlabeled, transfer, *(teacher_head or ())),
                     overwrite=train.overwrite or train.resume, is_dir=True)
        m = method.lower()
        if m not in METHODS:
            raise FacetoolError(f"unknown distillation method {method!r}; use one of {', '.join(METHODS)}")
        hint_pair = None
        if hint:
            parts = [p.strip() for p in hint.split(",")]
            if len(parts) != 2 or not all(parts):
                raise FacetoolError(f"--hint needs TEACHER_STAGE,STUDENT_STAGE (e.g. layer2,layer2), got {hint!r}")
            hint_pair = (parts[0], parts[1])
        cfg = TrainConfig.from_options(train, out=out)
        from facetool.distributed import is_main

        main = is_main()
        result = distill(
            m, store=store, student=student, cfg=cfg, teacher=teacher, teacher_heads=teacher_head,
            teacher_loss=teacher_loss, teacher_scale=teacher_scale, student_loss=student_loss,
            embedding_size=embedding_size, width=width, input_size=input_size, alpha=alpha, beta=beta, gamma=gamma,
            temperature=temperature, sr_loss=sr_loss, hint=hint_pair, unlabeled=unlabeled,
            unlabeled_weight=unlabeled_weight, mixup=mixup, transfer=transfer,
            labeled_per_identity=labeled_per_identity,
            on_config=show_config if main else None, teacher_arch=teacher_arch, partial_fc=partial_fc,
            plus=plus)
        if main:
            show_result(result)

    def show_config(config: dict) -> None:
        notes = config.pop("notes", [])
        console.print(dict_table(f"distill {config['method']}: settings", config, "setting"))
        for n in notes:
            console.print(f"note: {n}", highlight=False, soft_wrap=True)

    def show_result(result: dict) -> None:
        from rich.table import Table

        d = result.get("diagnostics")
        if not d:
            return
        rows = [("top1", "top-1 %"), ("top5", "top-5 %"), ("ce", "CE(labels)"), ("kl_teacher_student", "KL(teacher‖student)"),
                ("feat_dist", "L_FM: mean (h_T − h_S)²"), ("nmi", "NMI (k-means)"),
                ("transfer_top1", "transfer linear top-1 %")]
        tab = Table(title=f"distill {result['method']}: diagnostics on the test split", title_justify="left")
        for c in ("metric", "teacher", "student"):
            tab.add_column(c, justify="left" if c == "metric" else "right")

        def fmt(v):
            return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

        for key, label in rows:
            t, s = d["teacher"].get(key), d["student"].get(key)
            if t is None and s is None:
                continue
            tab.add_row(label, fmt(t), fmt(s))
        cost_t = result.get("teacher_cost", {})
        st = result["student"]
        tab.add_row("params M", fmt(cost_t.get("params_m")), fmt(st.get("params_m")))
        tab.add_row("GFLOPs", fmt(cost_t.get("gflops")), fmt(st.get("gflops")))
        console.print(tab)
