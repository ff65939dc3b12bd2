"""`facetool annotate`: import attribute annotations into a store, or estimate one with an IIG model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, dict_table, guarded, records_table
from facetool.errors import FacetoolError


def register(app: typer.Typer) -> None:
    @app.command("annotate")
    @guarded
    def annotate(
        csv: list[Path] = typer.Argument(None, help="Annotation CSV files: identity|source|index,feature,value[,annotator] "
                                                    "or wide identity|source|index,gender,age,..."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5) to annotate. [env FACETOOL_STORE]"),
        extend_vocab: bool = typer.Option(False, "--extend-vocab", help="Accept features/values outside the paper vocabulary."),
        replace: bool = typer.Option(False, "--replace", help="Drop the store's existing values of these features."),
        from_model: Optional[Path] = typer.Option(None, "--from-model", help="IIG checkpoint: estimate --feature by Eq. 5."),
        feature: Optional[str] = typer.Option(None, "--feature", help="Feature to estimate with --from-model."),
        as_name: Optional[str] = typer.Option(None, "--as", help="Attribute name for the estimate (default <feature>_estimated)."),
        batch_size: int = typer.Option(64, "--batch-size", min=1),
        in_place: bool = typer.Option(False, "--in-place", help="Modify the store in place instead of copy+rename (huge stores)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON."),
        arch: Optional[str] = arch_option(of="--from-model"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --as attribute, or a --json "
                                                                  "file this command did not write."),
        fairface: list[Path] = typer.Option(None, "--fairface", help="FairFace label CSV (fairface_label_train.csv, "
                                                                     "fairface_label_val.csv); repeat for both."),
    ) -> None:
        """Add attributes (gender, skin, eye_colour, facial_hair, race, age) to a face store.

        Example: facetool annotate --store data/imdb.h5 gender.csv age.csv
        or:      facetool annotate --store data/fairface.h5 --fairface fairface_label_train.csv --fairface fairface_label_val.csv
        or:      facetool annotate --store data/imdb.h5 --from-model runs/iig/model.pt --feature gender
        """
        from facetool.annotate import annotate_store, estimate_from_model
        from facetool.io import guard_output, write_json

        if json_out is not None:
            guard_output(json_out, inputs=(store, from_model, *(csv or ()), *(fairface or ())), overwrite=overwrite, option="--json", suffix=".json",
                         owner=f"annotate {Path(store).resolve()}")
        if fairface:
            if csv or from_model is not None:
                raise FacetoolError("give --fairface CSVs alone (not with annotation CSVs or --from-model)")
            from facetool.data.fairface import annotate_fairface

            res = annotate_fairface(store, fairface, in_place=in_place)
            recs = [{"attribute": a, "counts": ", ".join(f"{v} {n}" for v, n in d.items())}
                    for a, d in res["attributes"].items()]
            console.print(records_table(f"FairFace labels written to {store}: {res['matched']} rows matched", recs))
            if res["skipped_missing_image"]:
                console.print(f"[yellow]skipped {res['skipped_missing_image']} rows naming images not in the store[/] "
                              f"(e.g. {', '.join(res['missing_examples'])})")
        elif from_model is not None:
            if csv:
                raise FacetoolError("give either annotation CSVs or --from-model, not both")
            if not feature:
                raise FacetoolError("--from-model needs --feature (e.g. --feature gender)")
            with console.status(f"running {from_model.name} over {store.name}"):
                res = estimate_from_model(store, from_model, feature, as_name=as_name, batch_size=batch_size,
                                          in_place=in_place, arch=arch, overwrite=overwrite)
            rows = [(f"{res['attribute']} = {v}", n) for v, n in res["counts"].items()]
            for k in ("ground_truth_images", "accuracy", "accuracy_train", "accuracy_test"):
                if k in res:
                    rows.append((k, res[k]))
            console.print(dict_table(f"{res['feature']} estimated by Eq. 5", rows))
            if "accuracy" not in res:
                console.print(f"[dim]no ground truth for {res['feature']} in the store: accuracy not computed[/]")
        else:
            if arch is not None:
                raise FacetoolError("--arch applies to --from-model only")
            if not csv:
                raise FacetoolError("give annotation CSV files, or --from-model MODEL --feature NAME")
            res = annotate_store(store, csv, extend_vocab=extend_vocab, replace=replace, in_place=in_place)
            recs = [{"feature": f, "level": d["level"], "annotated": d["annotated"], "ties": d["ties"],
                     "counts": ", ".join(f"{v} {n}" for v, n in d["counts"].items())}
                    for f, d in res["features"].items()]
            console.print(records_table(f"annotations written to {store}", recs))
            if res["skipped_keys"]:
                console.print("[yellow]not in the store, skipped:[/] "
                              + ", ".join(f"{n} {k} keys" for k, n in res["skipped_keys"].items()))
        if json_out is not None:
            write_json(json_out, res)
            console.print(f"summary: {json_out}")
