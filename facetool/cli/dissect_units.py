"""`facetool dissect units`: Hierarchical Network Dissection of any named layer, and bias discovery."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from facetool.cli.common import (arch_option, checked_device, console, device_option, guarded, print_notes,
                                 records_table)


def register(group: typer.Typer) -> None:
    @group.command("units")
    @guarded
    def units(
        model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to dissect."),
        compare: Optional[List[Path]] = typer.Option(
            None, "--compare", help="Two checkpoints, suspect then reference: --compare biased.pt --compare clean.pt "
            "(or --compare biased.pt clean.pt); ranks the concept-subgroup links that differ."),
        store: Optional[Path] = typer.Option(None, "--store", envvar="FACETOOL_STORE",
                                             help="Face store building the dictionary (part masks or 5 landmarks + attributes). [env FACETOOL_STORE]"),
        dictionary: Optional[Path] = typer.Option(None, "--dictionary", help="User dictionary CSV in the published HND layout "
                                                  "(image,labels with ';'-separated mask PNGs) instead of a store."),
        layers: str = typer.Option(..., "--layers", help="Comma list of the model's named layers, e.g. layer3,layer4."),
        out: Path = typer.Option(..., "--out", help="Output folder: report.html, tally.csv, dissection.json (+ compare.csv)."),
        quantile: float = typer.Option(0.005, "--quantile", help="Top quantile of each unit's activations that forms its mask "
                                       "(Network Dissection: 0.005; the published HND code used 0.05)."),
        iou_threshold: float = typer.Option(0.04, "--iou-threshold", help="A unit is localizable at best IoU >= this."),
        split: str = typer.Option("all", "--split", help="Store split forming the dictionary: train, test or all."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use N dictionary images: a fixed sample "
                                            "stratified by identity (every identity equally, +-1; the same on every "
                                            "run); with --dictionary, the CSV's first N rows."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        top_images: int = typer.Option(6, "--top-images", min=1, max=64, help="Top-activating images kept per unit."),
        max_units: int = typer.Option(48, "--max-units", min=0, help="Units per layer drawn in the report."),
        device: str = device_option(),
        arch: Optional[str] = arch_option(of="--model/--compare"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder's files."),
        extra: Optional[List[str]] = typer.Argument(None, hidden=True),
    ) -> None:
        """Pair every unit of the given layers with face-dictionary concepts (parts, local attributes by region,
        global attributes), HND's probabilistic way; with --compare, rank the concept-subgroup links that differ
        between a suspect and a reference model (bias discovery).

        Example: facetool dissect units --model runs/gender/model.pt --store data/dict.h5 --layers layer3,layer4 --out dissect/
        """
        from facetool.errors import FacetoolError
        from facetool.explainers.units.report import dissect_to_folder

        from facetool.io import guard_output

        device = checked_device(device)  # before any work
        cmp = list(compare or []) + [Path(e) for e in (extra or [])]
        # the output folder is checked before anything else (the library checks it again)
        guard_output(out, inputs=(model, *cmp, store, dictionary), overwrite=overwrite, is_dir=True)
        if extra and not compare:
            raise FacetoolError(f"unexpected argument {extra[0]!r}")
        if cmp and model is not None:
            raise FacetoolError("give either --model or --compare, not both")
        if cmp and len(cmp) != 2:
            raise FacetoolError(f"--compare needs exactly two checkpoints (suspect, reference), got {len(cmp)}")
        models = cmp or ([model] if model is not None else [])
        from facetool import distributed as fd

        with fd.job(), console.status("dissecting units") as status:  # under torchrun: split over the ranks
            def progress(stage, done, total):
                status.update(f"{stage}: {min(done, total)}/{total} images")

            res = dissect_to_folder(out, models=models, layers=layers, store=store, dictionary_csv=dictionary,
                                    split=split, limit=limit, quantile=quantile, iou_threshold=iou_threshold,
                                    batch_size=batch_size, device=device, top_images=top_images, max_units=max_units,
                                    overwrite=overwrite, compare=bool(cmp), progress=progress, arch=arch)
        if res is None:  # another rank's share, merged and written by rank 0
            return
        d = res["dictionary"]
        console.print(f"dictionary: {d['images']} images, {d['concepts']} local concepts, global groups: "
                      f"{', '.join(d['groups']) or 'none'}"
                      + (f"; skipped {', '.join(f'{k}: {v}' for k, v in d['skipped'].items())}" if d["skipped"] else ""))
        recs = [{"model": m, "layer": ln, **c} for m, per in res["counts"].items() for ln, c in per.items()]
        console.print(records_table("units by concept type", recs))
        print_notes([f"{m}: {n}" if res["compare"] is not None else n for m, n in res["notes"]])
        if res["compare"] is not None:
            names = list(res["models"])
            cols = ["layer", "concept", "subgroup", f"units {names[0]}", f"units {names[1]}", f"mean P {names[0]}",
                    f"mean P {names[1]}"]
            if res["compare"]:
                console.print(records_table("bias discovery: concept-subgroup links that differ (units = holding the "
                                            "concept and biased to the subgroup)", res["compare"][:15], cols))
            else:
                contrasted = any(u.globals for r in res["results"].values() for lr in r.layers.values()
                                 for u in lr.units)
                print_notes(["bias discovery: no concept-subgroup link to compare: " + (
                    "no unit of either model holds a local concept" if contrasted else
                    "no global group with two values present was left (see the notes above)")])
        console.print(f"wrote {', '.join(res['files'])} to {out}")
