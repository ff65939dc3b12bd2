"""`facetool dissect gates`: which gated blocks run, per attribute, per image difficulty, per outcome."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, device_option, guarded, records_table


def register(group: typer.Typer) -> None:
    @group.command("gates")
    @guarded
    def gates(
        model: Path = typer.Option(..., "--model", help="AIG/IIG checkpoint."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5) with attributes. [env FACETOOL_STORE]"),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (PNGs, CSVs, JSON); a new or empty one "
                                                               "unless --overwrite (default: runs/dissect-<run>-<n>)."),
        attributes: Optional[str] = typer.Option(None, "--attributes", help="Comma list, e.g. gender,age (default: all)."),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        run: Optional[Path] = typer.Option(None, "--run", help="Training run folder: plot its top-1/top-5 curves."),
        batch_size: int = typer.Option(64, "--batch-size", min=1),
        identities: int = typer.Option(8, "--identities", min=1, help="Identities in the easy/hard grid."),
        per_identity: int = typer.Option(4, "--per-identity", min=1, help="Easy and hard images per identity."),
        arch: Optional[str] = arch_option(),
        device: str = device_option("auto"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing, non-empty --out folder."),
    ) -> None:
        """Gate execution per attribute value (heatmaps), easy/hard images, active gates of correct vs
        wrong predictions, training curves.

        Example: facetool dissect gates --model runs/aig/model.pt --store data/imdb.h5 --out runs/aig/dissect --attributes gender,age
        """
        from facetool.io import guard_output, next_free_folder, run_name
        from facetool.explainers.dissect import dissect_gates

        if out is None:
            out = next_free_folder("runs", f"dissect-{run_name(model)}")
        guard_output(out, inputs=(model, store, run), overwrite=overwrite, is_dir=True)

        attrs = [a.strip() for a in attributes.split(",") if a.strip()] if attributes else None
        with console.status(f"running {model.name} over {store.name} [{split}]"):
            res = dissect_gates(model, store, out, attributes=attrs, split=split, run=run, batch_size=batch_size,
                                identities=identities, per_identity=per_identity, arch=arch,
                                device=device)
        console.print(f"{res['images']} images, {res['blocks']} gated blocks, top-1 {res['top1']:.2f} %, "
                      f"top-5 {res['top5']:.2f} %, gate rate {res['gate_rate']:.3f}")
        recs = [{"attribute": a, "images per value": ", ".join(f"{v} {n}" for v, n in d["images"].items()),
                 "max spread": d["max_spread"], "block": d["most_selective_block"]}
                for a, d in res["attributes"].items()]
        if recs:
            console.print(records_table("gate execution by attribute (spread = max-min fraction over values)", recs))
        st = res["active_gates"]
        console.print(records_table("active gates per image", [{"prediction": k, **v} for k, v in st.items()]))
        console.print(f"wrote {len(res['files'])} files to {out}")
