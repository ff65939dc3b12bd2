"""`facetool prepare landmarks`: 300W (.pts) or WFLW (98-point list file) -> a face store with landmark sets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded


def register(prepare_app: typer.Typer) -> None:
    @prepare_app.command("landmarks")
    @guarded
    def landmarks(
        fmt: str = typer.Option(..., "--format", help="300w: .pts files (1-based, 68 points) beside the images under "
                                                      "--root; wflw: a list_98pt_rect_attr_*.txt (--list) over the "
                                                      "WFLW_images folder (--root)."),
        root: Path = typer.Option(..., "--root", help="Image folder (300W: with the .pts files; WFLW: WFLW_images)."),
        list_file: Optional[Path] = typer.Option(None, "--list", help="WFLW: the annotation list file (required); "
                                                                      "300W: optional list of images, relative to "
                                                                      "--root, one a line (default: all images)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output store (.h5)."),
        size: int = typer.Option(256, "--size", help="Crop size in pixels (square)."),
        margin: float = typer.Option(0.25, "--margin", help="Added on each side of the landmarks' box, as a fraction "
                                                            "of its longer side."),
        identities: str = typer.Option("image", "--identities", help="image: each image is its own identity; folder: "
                                                                     "the image's parent folder."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of the identities in the test split."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (same options)."),
    ) -> None:
        """Import annotated landmarks into a face store: each face cropped around its landmarks' box (square,
        --margin), resized to --size, the points moved with it. 300W stores the ibug68 set; WFLW stores wflw98 and
        its ibug68 reduction, and its 6 attribute flags. The 5 alignment points come from the landmarks.

        Example: facetool prepare landmarks --format 300w --root 300W/ --out data/300w.h5
        """
        from facetool.data.imdbface import report_path
        from facetool.data.landmark_import import prepare_landmarks

        path, rep = prepare_landmarks(out, fmt=fmt, root=root, list_file=list_file, size=size, margin=margin,
                                      identities=identities, test_fraction=test_fraction, seed=seed,
                                      overwrite=overwrite, resume=resume)
        rows = [("identities", rep["identities"]), ("images", rep["images"]), ("train", rep["train"]),
                ("test", rep["test"]), ("identities from", identities),
                ("landmark sets", ", ".join(rep["settings"]["landmark_sets"]))]
        rows += [(f"dropped: {k}", v) for k, v in rep["dropped"].items()]
        console.print(dict_table(f"{fmt} landmarks", rows, key="", value="count"))
        console.print(f"store: {rep['store']}  report: {report_path(path)}")
