"""`facetool train condface`: CondFace models (thesis ch. 5) with CosFace and routing-vector clustering."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options


def register(app: typer.Typer) -> None:
    @app.command("condface")
    @guarded
    @training_options(epochs=32, batch_size=512, lr=0.1, schedule="step", milestones="16,20,24,28")
    def condface(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5) to train on (train split; test split validates). [env FACETOOL_STORE]"),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder: model.pt, backbone.pth, heads.pt, metrics, "
                                                               "resume state (default: runs/condface-<variant>-<n>)."),
        variant: str = typer.Option("dgconv", "--variant", help="dc (dynamic convolutions, the thesis's DC) | dgconv "
                                                                "(dynamic group convolutions, AS4 / CondFace)."),
        network: str = typer.Option("r18", "--network", help="IR-ResNet depth: r18 | r34 | r50 | r100 | r200."),
        loss: str = typer.Option("cosface", "--loss", help="Face-recognition loss L_fr: cosface (thesis) | arcface | softmax."),
        embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding dimension."),
        input_size: int = typer.Option(112, "--input-size", help="Network input size (images are resized)."),
        width: int = typer.Option(64, "--width", help="IR-ResNet base width (64 = arcface_torch)."),
        scale: float = typer.Option(64.0, "--scale", help="Logit scale s."),
        routing_temperature: str = typer.Option("", "--routing-temperature", help="START:END routing softmax "
                                                "temperature, linear per epoch (DyConv: 30:1; default: 1 throughout)."),
        clustering: str = typer.Option("none", "--clustering", help="none | sinkhorn (trainable prototypes, SwAV "
                                                                    "targets) | kmeans (DeepCluster-v2: k-means after "
                                                                    "each epoch, centroids = frozen classifier of the "
                                                                    "next; epoch 1 trains L_fr alone; CondFace) on the "
                                                                    "routing vectors."),
        prototypes: int = typer.Option(300, "--prototypes", help="Number of prototypes P (thesis: 300)."),
        cluster_head: str = typer.Option("mlp", "--cluster-head", help="identity | linear | mlp: the head on the "
                                                                       "routing vector before the prototypes."),
        lam: float = typer.Option(1.0, "--lambda", help="Weight of the clustering loss L_cls (thesis: 1)."),
        init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint: a CondFace model of the "
                                            "same architecture (weights copied, fresh training state) or a BL "
                                            "IR-ResNet of the same depth and width (experts from its kernels: DC "
                                            "exactly the BL, DGConv an approximation). The thesis starts "
                                            "clustering runs from the pretrained model."),
        val_bin: list[Path] = typer.Option([], "--val-bin", help="Verification pack(s) (.bin) checked every epoch."),
        partial_fc: Optional[float] = typer.Option(None, "--partial-fc", help="PartialFC: split L_fr's margin head over the torchrun processes and sample this share of each rank's centres per step (all positives kept; 1 = all)."),
        train: TrainOptions = None,
    ) -> None:
        """Train a CondFace model: L = CosFace + lambda * L_cls on the routing vectors (thesis Eq. 5.6).

        Example: facetool train condface --store vgg.h5 --variant dgconv --clustering kmeans --prototypes 300
        """
        from facetool.engine import TrainConfig
        from facetool.data.sources import input_paths
        from facetool.io import guard_run_folder
        from facetool.trainers.condface import condface_network, parse_temperature, train_condface

        condface_network(variant, network)  # bad names before anything is written
        temperature = parse_temperature(routing_temperature)
        inputs = (*input_paths(store), *val_bin, *([init] if init is not None else []))
        out = guard_run_folder(out, f"condface-{variant}", inputs=inputs, overwrite=train.overwrite, resume=train.resume)
        cfg = TrainConfig.from_options(train, out=out)
        result = train_condface(store, cfg, variant=variant, network=network, clustering=clustering,
                                prototypes=prototypes, head=cluster_head, lam=lam, temperature=temperature, loss=loss,
                                width=width, embedding_size=embedding_size, input_size=input_size, s=scale,
                                val_bins=val_bin, init=init,
                                **({"partial_fc": partial_fc} if partial_fc is not None else {}))
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        console.print(dict_table(f"train condface ({variant}, {clustering}) -> {out}", shown, "metric"))
