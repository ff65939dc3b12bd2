"""`facetool dissect attention`: attention-map overlays, mean maps per attribute value, share per facial part."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, checked_device, console, device_option, guarded, records_table


def register(group: typer.Typer) -> None:
    @group.command("attention")
    @guarded
    def attention(
        model: Path = typer.Option(..., "--model", help="Checkpoint of a model with an attention map (facetool train abn)."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5). [env FACETOOL_STORE]"),
        out: Path = typer.Option(..., "--out", help="Output folder: overlays.png (labelled images x heads, colour bar), mean_maps.png/.npz, part_shares.csv, attention.json."),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        images: int = typer.Option(8, "--images", min=0, help="Images (rows) in the overlay grid."),
        max_heads: int = typer.Option(8, "--max-heads", min=1, help="Attention maps (columns) shown per image."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        arch: Optional[str] = arch_option(),
        device: str = device_option(),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder's files."),
    ) -> None:
        """Where the attention maps look: overlays, the mean map per attribute value, and the share of
        attention per facial part (store part masks, or discs around the 5 landmarks) beside the part's
        area share (ratio > 1: the map concentrates there).

        Example: facetool dissect attention --model runs/abn/model.pt --store data/synthetic.h5 --out runs/abn/attention
        """
        from facetool.explainers.attention import dissect_attention, shares_table

        device = checked_device(device)  # before any work
        with console.status(f"running {model.name} over {store.name} [{split}]"):
            res = dissect_attention(model, store, out, split=split, batch_size=batch_size, images=images,
                                    max_heads=max_heads, overwrite=overwrite, device=device, arch=arch)
        console.print(f"{res['images']} images, {res['maps']} attention map(s) of {res['map_size_model'][0]}x"
                      f"{res['map_size_model'][1]} per image, parts from {res['part_source'] or 'nowhere (none in the store)'}")
        if res["part_shares"]:
            console.print(records_table("attention share per facial part (top 3 per map, by ratio to area share)",
                                        shares_table(res["part_shares"])))
        console.print(f"wrote {', '.join(res['files'])} to {out}")
