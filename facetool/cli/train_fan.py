"""`facetool train fan`: a FAN (stacked hourglass) on a store's dense landmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options


def register(app: typer.Typer) -> None:
    @app.command("fan")
    @guarded
    @training_options(epochs=40, batch_size=16, lr=0.1, schedule="cosine")
    def fan(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5) with dense landmarks "
                                   "(train split; the test split validates). [env FACETOOL_STORE]"),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder: model.pt, metrics, resume state "
                                                               "(default: runs/fan-<n>)."),
        stacks: int = typer.Option(2, "--stacks", help="Hourglass stacks, 1-4 (the public FAN: 4; FAN-Face: 2)."),
        loss: str = typer.Option("l2", "--loss", help="Heatmap loss on every stack: l2 | awing (adaptive wing)."),
        sigma: float = typer.Option(1.5, "--sigma", help="Gaussian sigma of the target heatmaps, in heatmap cells."),
        peak: float = typer.Option(10.0, "--peak", help="Maximum of the Gaussian target heatmaps: > 1 weighs the cells "
                                   "near the points against the background (peak 1 learns all-zero maps slowly)."),
        input_size: int = typer.Option(256, "--input-size", help="FAN input size, a multiple of 64 (store crops are "
                                                                 "resized); heatmaps are a quarter of it."),
        width: int = typer.Option(256, "--width", help="Hourglass width (the public FAN: 256; smaller trains faster)."),
        convention: Optional[str] = typer.Option(None, "--convention", help="Landmark set of the store (ibug68, "
                                                 "wflw98; default: the only one it has)."),
        init: Optional[Path] = typer.Option(None, "--init", help="Start from a FAN file (public 2DFAN4 layout, "
                                                                 "TorchScript .zip or facetool checkpoint)."),
        train: TrainOptions = None,
    ) -> None:
        """Train a FAN: Gaussian heatmap targets, L2 or adaptive-wing loss on every stack, flips with the
        convention's left/right permutation; validation NME / AUC@0.08 on the test split.

        Example: facetool train fan --store data/synthetic.h5 --stacks 2 --loss awing --out runs/fan
        """
        from facetool.engine import TrainConfig
        from facetool.io import guard_run_folder
        from facetool.models.fan import FAN
        from facetool.store import FaceStore
        from facetool.trainers.fan import LOSSES, train_fan

        if loss not in LOSSES:
            from facetool.errors import FacetoolError

            raise FacetoolError(f"unknown --loss {loss!r}; use one of {', '.join(LOSSES)}")
        FAN.check_arguments(stacks, 68, input_size, width)
        out = guard_run_folder(out, "fan", inputs=(store, *([init] if init else [])), overwrite=train.overwrite,
                               resume=train.resume)
        with FaceStore(store) as s:
            s.landmark_set(convention, [])  # a store without the landmarks: one line, before anything is written
        cfg = TrainConfig.from_options(train, out=out)
        result = train_fan(store, cfg, stacks=stacks, loss=loss, sigma=sigma, input_size=input_size,
                           width=width, convention=convention, init=init, peak=peak)
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        console.print(dict_table(f"train fan ({stacks} stacks, {loss}) -> {out}", shown, "metric"))
