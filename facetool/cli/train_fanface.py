"""`facetool train fanface`: FAN-Face (thesis ch. 3), a frozen FAN inside an IR-ResNet ArcFace recogniser."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.cli.options import TrainOptions, training_options


def register(app: typer.Typer) -> None:
    @app.command("fanface")
    @guarded
    @training_options(epochs=20, batch_size=128, lr=0.1, schedule="poly")
    def fanface(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (HDF5) or RecordIO pack to "
                                   "train on (train split; test split validates). [env FACETOOL_STORE]"),
        fan: Path = typer.Option(..., "--fan", help="The FAN (frozen): a `facetool train fan` model.pt, a public 2DFAN "
                                 "state_dict (.pth.tar) or TorchScript .zip; 2+ hourglasses (a 4-stack one is cut to 2)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder: model.pt (FAN + recogniser), metrics, resume "
                                                               "state (default: runs/fanface-<network>-<n>)."),
        network: str = typer.Option("r34", "--network", help="The recogniser: r18 | r34 | r50 | r100 | r200 (IR-ResNet)."),
        input_heatmaps: str = typer.Option("none", "--input-heatmaps", help="none | h2 (hourglass-2 heatmaps of the 51 "
                                           "internal points stacked with the image: 54 channels, Eq. 3.1) | h2+ (also "
                                           "at each stage's input)."),
        integration: str = typer.Option("bl", "--integration", help="none | bl | sl | al: integration layers "
                                        "y + gamma * f(x_l, y) (Eq. 3.2; gamma learnable, starts at 0)."),
        taps: str = typer.Option("h2l-2", "--taps", help="FAN features x_l: h2l-2 (high-to-low half of hourglass 2) "
                                 "| l2h-2 (its low-to-high half)."),
        mode: str = typer.Option("1-1", "--mode", help="1-1 (one integration per stage, at its end) | 1-m (one after "
                                 "every block)."),
        multitask: bool = typer.Option(False, "--multitask/--no-multitask", help="The multi-task baseline: a heatmap "
                                       "head after the last stage, + 0.1 x L2 to the FAN's heatmaps."),
        loss: str = typer.Option("arcface", "--loss", help="arcface | cosface | softmax."),
        embedding_size: int = typer.Option(512, "--embedding-size", help="Embedding dimension."),
        input_size: int = typer.Option(112, "--input-size", help="Recogniser input size (the FAN sees it resized to "
                                                                 "its own)."),
        width: int = typer.Option(64, "--width", help="IR-ResNet base width (64 = arcface_torch)."),
        scale: float = typer.Option(64.0, "--scale", help="Logit scale s."),
        train: TrainOptions = None,
    ) -> None:
        """Train FAN-Face: a frozen FAN's heatmaps and hourglass features inside an IR-ResNet trained with ArcFace
        (train arcface's recipe; add --grad-clip 5 --workers N for arcface_torch's). The checkpoint holds both
        networks and works in eval lfw|ijbc|classify, export and dissect relevance.

        Example: facetool train fanface --store vgg.h5 --fan runs/fan/model.pt --network r34 --integration bl --taps h2l-2 --out runs/ff
        """
        from facetool.engine import TrainConfig
        from facetool.data.sources import input_paths
        from facetool.io import guard_run_folder
        from facetool.models.fanface import INPUT_HEATMAPS, INTEGRATIONS, MODES, TAPS, _choice
        from facetool.trainers.fanface import load_fan, train_fanface

        choices = {o: _choice(v, a, o) for v, a, o in (
            (input_heatmaps, INPUT_HEATMAPS, "--input-heatmaps"), (integration, INTEGRATIONS, "--integration"),
            (taps, TAPS, "--taps"), (mode, MODES, "--mode"))}
        out = guard_run_folder(out, f"fanface-{network}", inputs=(*input_paths(store), fan), overwrite=train.overwrite,
                               resume=train.resume)
        load_fan(fan)  # a wrong file: one line before the run starts
        cfg = TrainConfig.from_options(train, out=out)
        result = train_fanface(store, cfg, fan=fan, network=network, input_heatmaps=choices["--input-heatmaps"],
                               integration=choices["--integration"], taps=choices["--taps"], mode=choices["--mode"],
                               multitask=multitask, width=width, loss=loss, embedding_size=embedding_size,
                               input_size=input_size, s=scale)
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        console.print(dict_table(f"train fanface ({network}, heatmaps {choices['--input-heatmaps']}, integration "
                                 f"{choices['--integration']} {choices['--taps']} {choices['--mode']}"
                                 f"{', multitask' if multitask else ''}) -> {out}", shown, "metric"))
