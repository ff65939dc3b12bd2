"""`facetool dissect relevance`: LRP / Grad-CAM / attention maps, validated by perturbation and parts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import (arch_option, checked_device, console, device_option, guarded, print_notes,
                                 records_table)


def register(group: typer.Typer) -> None:
    @group.command("relevance")
    @guarded
    def relevance(
        model: Path = typer.Option(..., "--model", help="Checkpoint (classifier or embedding model)."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5). [env FACETOOL_STORE]"),
        out: Path = typer.Option(..., "--out", help="Output folder: overlay.png, mean_maps.png, curves.png/csv, parts.csv, maps.h5, metrics.json."),
        method: str = typer.Option("lrp", "--method", help="lrp | lrp-gamma | lrp-ab | gradcam | gradcam++ | scorecam | random | attention."),
        target: str = typer.Option("predicted", "--target", help="label | predicted | attribute:NAME | cosine (embedding models)."),
        reference: Optional[str] = typer.Option(None, "--reference", help="Only with --target cosine: self | same-identity | IMAGE file | pairs.txt (lines 'i j' of store indices)."),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        limit: int = typer.Option(64, "--limit", help="Images to explain (>= 1)."),
        batch_size: int = typer.Option(16, "--batch-size", help=">= 1."),
        steps: int = typer.Option(10, "--steps", help="Perturbation steps (>= 1)."),
        max_fraction: float = typer.Option(0.5, "--max-fraction", help="Fraction of the image removed at the last step, in (0, 1]."),
        patch: int = typer.Option(8, "--patch", help="Removed region size in pixels (1 = single pixels; at most the model's input size)."),
        fill: str = typer.Option("mean", "--fill", help="mean | blur | black."),
        grid: int = typer.Option(16, "--grid", help="Images in the overlay grid (>= 1)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random ordering / random maps."),
        arch: Optional[str] = arch_option(),
        device: str = device_option("cpu"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder's files."),
    ) -> None:
        """Relevance maps of a model over a store, validated by pixel/patch perturbation (MoRF, LeRF,
        random order, AOPC) and, on stores with part masks, relevance mass per face part.

        Example: facetool dissect relevance --model runs/r18/model.pt --store data/synth.h5 --out runs/r18/relevance --method lrp --target label
        """
        from facetool.explainers.relevance import dissect_relevance
        from facetool.explainers.relevance.run import check_options

        device = checked_device(device)  # every check that needs no file, before any work
        check_options(method=method, target=target, reference=reference, fill=fill, limit=limit,
                      batch_size=batch_size, steps=steps, max_fraction=max_fraction, patch=patch, grid=grid)
        from facetool import distributed as fd

        with fd.job(), console.status(f"explaining {model.name} with {method}"):  # torchrun: split over the ranks
            res = dissect_relevance(model, store, out, method=method, target=target, reference=reference,
                                    split=split, limit=limit, batch_size=batch_size, steps=steps,
                                    max_fraction=max_fraction, patch=patch, fill=fill, grid=grid, seed=seed,
                                    overwrite=overwrite, arch=arch, device=device)
        if res is None:  # another rank's share, merged and written by rank 0
            return
        print_notes(res["notes"])
        console.print(f"{res['method']} on {res['images']} images, target {res['target']} "
                      f"({res['maps_per_second']:.1f} maps/s); perturbation score = {res['score']}")
        console.print(records_table("perturbation AOPC (higher MoRF, lower LeRF = better)", [
            {"ordering": k, "AOPC": res[f"aopc_{k}"]} for k in ("morf", "lerf", "random")]))
        if res["parts"]:
            console.print(records_table("positive relevance per part (ratio > 1: more than its area)", res["parts"]))
        console.print(f"wrote {len(res['files'])} files to {out}")

    @group.command("generalisation")
    @guarded
    def generalisation(
        models: str = typer.Option(..., "--models", help="Comma-separated classifier checkpoints (identity or attribute:NAME models)."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5). [env FACETOOL_STORE]"),
        out: Path = typer.Option(..., "--out", help="Output folder: matrix.png, matrix.csv, matrix.json."),
        method: str = typer.Option("lrp", "--method", help="lrp | lrp-gamma | lrp-ab | gradcam | gradcam++ | scorecam | random."),
        fraction: float = typer.Option(0.2, "--fraction", help="Fraction of each image masked (most relevant patches first)."),
        patch: int = typer.Option(8, "--patch", help="Masked region size in pixels."),
        fill: str = typer.Option("mean", "--fill", help="mean | blur | black."),
        split: str = typer.Option("test", "--split"),
        limit: int = typer.Option(64, "--limit", help="Images."),
        batch_size: int = typer.Option(16, "--batch-size"),
        seed: int = typer.Option(0, "--seed"),
        arch: Optional[str] = arch_option(of="--models"),
        device: str = device_option("cpu"),
        overwrite: bool = typer.Option(False, "--overwrite"),
    ) -> None:
        """Do relevance maps generalise across models? Mask each image by model A's relevance (its own
        target) and measure model B's accuracy drop on B's own task: rows A (and a random-mask row),
        columns B.

        Example: facetool dissect generalisation --models runs/id0/model.pt,runs/id1/model.pt,runs/gender/model.pt --store data/synth.h5 --out runs/gen
        """
        from facetool.explainers.relevance import generalisation_matrix

        device = checked_device(device)  # before any work
        paths = [Path(p.strip()) for p in models.split(",") if p.strip()]
        with console.status(f"masking by {len(paths)} models' relevance"):
            res = generalisation_matrix(paths, store, out, method=method, split=split, limit=limit, fraction=fraction,
                                        patch=patch, fill=fill, batch_size=batch_size, seed=seed, overwrite=overwrite,
                                        arch=arch, device=device)
        print_notes(res["notes"])
        recs = [{"masked by": r, **{m: v for m, v in row.items()}} for r, row in res["drop"].items()]
        console.print("base accuracy: " + ", ".join(f"{m} {a:.3f}" for m, a in res["base_accuracy"].items()))
        console.print(records_table(f"accuracy drop with the top {res['fraction']:.0%} masked ({res['method']})", recs))
        console.print(f"wrote {len(res['files'])} files to {out}")
