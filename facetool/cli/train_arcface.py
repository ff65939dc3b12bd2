"""`facetool train arcface`: recognition backbones with ArcFace / CosFace / softmax heads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options

#: --network help (static: --help must not import torch; tests/test_cli_options.py checks it against the registry)
NETWORK_HELP = "r18 | r34 | r50 | r100 | r200 | mbf (arcface_torch's names of iresnet18 ... iresnet200 and " \
               "mobilefacenet, which work too)."


def register(app: typer.Typer) -> None:
    @app.command("arcface")
    @guarded
    @training_options(epochs=20, batch_size=128, lr=0.1, schedule="poly")
    def arcface(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5) to train on (train split; test split validates). [env FACETOOL_STORE]"),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder: model.pt, backbone.pth, metrics, resume state "
                                                               "(default: runs/arcface-<network>-<n>, the next free n)."),
        network: str = typer.Option("r50", "--network", help=NETWORK_HELP),
        loss: str = typer.Option("arcface", "--loss", help="arcface | cosface | softmax."),
        embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding dimension."),
        input_size: int = typer.Option(112, "--input-size", help="Network input size (images are resized)."),
        width: int = typer.Option(64, "--width", help="IR-ResNet base width (64 = arcface_torch)."),
        scale: float = typer.Option(64.0, "--scale", help="Logit scale s."),
        margins: str = typer.Option("", "--margins", help="Combined margin m1,m2,m3 (overrides --loss defaults)."),
        val_bin: list[Path] = typer.Option([], "--val-bin", help="Verification pack(s) (.bin) checked every epoch."),
        partial_fc: Optional[float] = typer.Option(None, "--partial-fc", help="PartialFC: split the head's classes over the torchrun processes and sample this share of each rank's centres per step (all positives kept; 1 = all)."),
        train: TrainOptions = None,
    ) -> None:
        """Train a recognition backbone (arcface_torch recipe) through the facetool engine.

        arcface_torch also clips the gradient norm at 5 and loads with several workers: add --grad-clip 5
        --workers 8 for its recipe (recipes/thesis_recognition.toml does).

        Example: facetool train arcface --store vgg.h5 --network r50 --loss arcface --grad-clip 5 --out runs/arc
        """
        from facetool.engine import TrainConfig
        from facetool.errors import FacetoolError
        from facetool.data.sources import input_paths
        from facetool.io import guard_run_folder
        from facetool.trainers.arcface import parse_margins, resolve_network, train_arcface

        name = resolve_network(network)
        out = guard_run_folder(out, f"arcface-{network}", inputs=(*input_paths(store), *val_bin), overwrite=train.overwrite,
                               resume=train.resume)
        if width != 64 and not name.startswith("iresnet"):
            raise FacetoolError(f"--width applies to IR-ResNets only, not {name}")
        cfg = TrainConfig.from_options(train, out=out)
        result = train_arcface(store, cfg, network=name, loss=loss, embedding_size=embedding_size,
                               input_size=input_size, s=scale, margins=parse_margins(margins), val_bins=val_bin,
                               model_kwargs={"width": width} if name.startswith("iresnet") and width != 64 else None,
                               partial_fc=partial_fc)
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        console.print(dict_table(f"train arcface ({name}, {loss}) -> {out}", shown, "metric"))
