"""`facetool train arcface`: recognition backbones with ArcFace / CosFace / softmax heads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded


def register(app: typer.Typer) -> None:
    @app.command("arcface")
    @guarded
    def arcface(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5) to train on (train split; test split validates). [env FACETOOL_STORE]"),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder: model.pt, backbone.pth, metrics, resume state "
                                                               "(default: runs/arcface-<network>-<n>, the next free n)."),
        network: str = typer.Option("r50", "--network", help="r18 | r34 | r50 | r100 | r200 | mbf (or a registry name)."),
        loss: str = typer.Option("arcface", "--loss", help="arcface | cosface | softmax."),
        embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding dimension."),
        input_size: int = typer.Option(112, "--input-size", help="Network input size (images are resized)."),
        width: int = typer.Option(64, "--width", help="IR-ResNet base width (64 = arcface_torch)."),
        scale: float = typer.Option(64.0, "--scale", help="Logit scale s."),
        margins: str = typer.Option("", "--margins", help="Combined margin m1,m2,m3 (overrides --loss defaults)."),
        epochs: int = typer.Option(20, "--epochs"),
        batch_size: int = typer.Option(128, "--batch-size", help="Per process (GPU)."),
        lr: float = typer.Option(0.1, "--lr"),
        momentum: float = typer.Option(0.9, "--momentum"),
        weight_decay: float = typer.Option(5e-4, "--weight-decay"),
        schedule: str = typer.Option("poly", "--schedule", help="poly | cosine | step."),
        warmup_epochs: float = typer.Option(0.0, "--warmup-epochs"),
        grad_clip: float = typer.Option(5.0, "--grad-clip", help="Gradient-norm clip (0 = off)."),
        amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
        workers: int = typer.Option(4, "--workers", help="DataLoader workers."),
        seed: int = typer.Option(0, "--seed"),
        val_bin: list[Path] = typer.Option([], "--val-bin", help="Verification pack(s) (.bin) checked every epoch."),
        max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many steps (0 = all; resume later)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an existing --out."),
    ) -> None:
        """Train a recognition backbone (arcface_torch recipe) through the facetool engine."""
        from facetool.engine import TrainConfig
        from facetool.errors import FacetoolError
        from facetool.io import guard_run_folder
        from facetool.trainers.arcface import parse_margins, resolve_network, train_arcface

        name = resolve_network(network)
        out = guard_run_folder(out, f"arcface-{network}", inputs=(store, *val_bin), overwrite=overwrite, resume=resume)
        if width != 64 and not name.startswith("iresnet"):
            raise FacetoolError(f"--width applies to IR-ResNets only, not {name}")
        cfg = TrainConfig(out=out, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, amp=amp,
                          seed=seed, workers=workers, grad_clip=grad_clip or None, resume=resume, overwrite=overwrite,
                          max_steps=max_steps or None)
        result = train_arcface(store, cfg, network=name, loss=loss, embedding_size=embedding_size,
                               input_size=input_size, s=scale, margins=parse_margins(margins), val_bins=val_bin,
                               model_kwargs={"width": width} if name.startswith("iresnet") and width != 64 else None)
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        console.print(dict_table(f"train arcface ({name}, {loss}) -> {out}", shown, "metric"))
