"""`facetool dissect routing`: do a CondFace model's routing vectors cluster by attribute (thesis Table 5.1)?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, device_option, guarded, print_notes, records_table


def register(group: typer.Typer) -> None:
    @group.command("routing")
    @guarded
    def routing(
        model: Path = typer.Option(..., "--model", help="CondFace checkpoint (routing vectors), or any model whose "
                                                        "stages are pooled (the BL row)."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE",
                                   help="Face store (.h5) with age, gender, race (or group) and pose. [env FACETOOL_STORE]"),
        clusters: str = typer.Option("30,300,1000", "--clusters", help="Comma list of k-means cluster counts, each "
                                     ">= 2 and at most the number of images (Table 5.1: 30,300,1000)."),
        compare: Optional[Path] = typer.Option(None, "--compare", help="A second model in the same table, e.g. the "
                                               "BL (IR-18): GAP of its last three stages concatenated."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder: routing.csv/json, t-SNE and cluster "
                                           "grid PNGs; a new or empty one unless --overwrite (default: "
                                           "runs/dissect-routing-<run>-<n>)."),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        max_images: Optional[int] = typer.Option(None, "--max-images", help="Cluster a fixed sample of N images "
                                                 "of the split (default: all)."),
        kmeans: str = typer.Option("spherical", "--kmeans", help="spherical (cosine, as DeepCluster-v2) or plain "
                                   "(Euclidean) k-means."),
        batch_size: int = typer.Option(64, "--batch-size"),
        seed: int = typer.Option(0, "--seed", help="k-means start, image sample and t-SNE seed."),
        arch: Optional[str] = arch_option(),
        device: str = device_option("auto"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing, non-empty --out folder."),
    ) -> None:
        """Cluster routing vectors (k-means per --clusters count, and a clustering-trained model's own
        classifier) and score them against the cohort code (age x gender x race x pitch x yaw) and each
        attribute: purity and AMI, as the thesis's Table 5.1.

        Example: facetool dissect routing --model runs/condface/model.pt --compare runs/bl/model.pt --store data/fairface.h5 --clusters 30,300
        """
        from facetool.errors import FacetoolError
        from facetool.explainers.routing import parse_clusters
        from facetool.io import guard_output, next_free_folder, run_name

        if split not in ("train", "test", "all"):
            raise FacetoolError(f"--split must be train, test or all, got {split!r}")
        if kmeans not in ("spherical", "plain"):
            raise FacetoolError(f"--kmeans must be spherical or plain, got {kmeans!r}")
        parse_clusters(clusters)  # the syntax and >= 2 before any work; the image count once the store is read
        if out is None:
            out = next_free_folder("runs", f"dissect-routing-{run_name(model)}")
        guard_output(out, inputs=(model, store, compare), overwrite=overwrite, is_dir=True)

        from facetool.explainers.routing import dissect_routing

        with console.status("dissecting routing") as status:
            res = dissect_routing(model, store, out, clusters=clusters, compare=compare, split=split,
                                  max_images=max_images, batch_size=batch_size, seed=seed,
                                  spherical=kmeans == "spherical", device=device, arch=arch,
                                  progress=lambda s: status.update(s))
        used = " x ".join(res["cohort_parts"])
        cols = ["model", "clustering"] + [t for t in res["targets"]]
        recs = [{"model": r["model"], "clustering": r["clustering"],
                 **{t: f"{r[f'{t}_purity']:.2f}/{r[f'{t}_ami']:.2f}" for t in res["targets"]}} for r in res["rows"]]
        console.print(records_table(f"purity/AMI % of {res['images']} images ({split} split; cohort = {used})", recs,
                                    cols))
        for name, m in res["models"].items():
            console.print(f"{name}: {m['dim']}-d {m['vectors']}")
        print_notes(res["notes"])
        console.print(f"wrote {', '.join(res['files'])} to {out}")
