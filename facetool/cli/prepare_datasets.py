"""`facetool prepare imdb-face` and `facetool prepare folder`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from facetool.cli.common import console, dict_table, guarded


def _show(title: str, rep: dict[str, Any], json_path: Path) -> None:
    rows = [("identities", rep["identities"]), ("images", rep["images"]), ("train", rep["train"]), ("test", rep["test"])]
    rows += [(f"dropped: {k}", v) for k, v in rep["dropped"].items()]
    console.print(dict_table(title, rows, key="", value="count"))
    console.print(f"store: {rep['store']}  report: {json_path}")


def register(prepare_app: typer.Typer) -> None:
    @prepare_app.command("imdb-face")
    @guarded
    def imdb_face(
        root: Path = typer.Option(..., "--root", help="Image root: <root>/<index>/<image> (or <name>_<index>/, <name>/)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output store (.h5)."),
        csv: Optional[Path] = typer.Option(None, "--csv", help="IMDb-Face.csv (default: <root>/IMDb-Face.csv)."),
        min_images: int = typer.Option(100, help="Keep identities with at least this many valid images."),
        per_identity: int = typer.Option(100, help="Images sampled per identity (0: all)."),
        size: Optional[int] = typer.Option(None, help="Crop size (default 128 for bbox, 112 for retinaface)."),
        align: str = typer.Option("bbox", help="bbox: crop+resize the box (ConvNet-IIG); retinaface: detect in the box, 5-point align."),
        test_fraction: float = typer.Option(0.2, help="Fraction of each identity's images in the test split."),
        seed: int = typer.Option(0, help="Seed of the sampling and the split."),
        detector: Optional[Path] = typer.Option(None, help="Detector ONNX for --align retinaface (default: bundled RetinaFace)."),
        workers: int = typer.Option(1, help="Decoding threads."),
        overwrite: bool = typer.Option(False, help="Replace an existing store."),
        resume: bool = typer.Option(False, help="Continue an interrupted run."),
    ) -> None:
        """IMDb-Face (distributed CSV + downloaded images) -> face store, as ConvNet-IIG prepared it."""
        from facetool import distributed as fd
        from facetool.data.imdbface import prepare_imdbface, report_path

        with fd.job():  # under torchrun: the identities split over the ranks, rank 0 writes
            got = prepare_imdbface(
                csv, root, out, min_images=min_images, per_identity=per_identity or None, size=size, align=align,
                test_fraction=test_fraction, seed=seed, detector_model=detector, workers=workers,
                overwrite=overwrite, resume=resume,
            )
        if got is None:
            return
        path, rep = got
        _show("IMDb-Face", rep, report_path(path))

    @prepare_app.command("folder")
    @guarded
    def folder(
        root: Path = typer.Argument(..., help="Dataset folder with one sub-folder per identity."),
        out: Path = typer.Option(..., "--out", "-o", help="Output store (.h5)."),
        aligned: bool = typer.Option(False, "--aligned", help="Images are already aligned crops: only resize."),
        size: int = typer.Option(112, help="Crop size."),
        min_images: int = typer.Option(1, help="Keep identities with at least this many images (usable ones with "
                                                "--per-identity)."),
        per_identity: int = typer.Option(0, help="Images sampled per identity (0: all); a file that does not decode "
                                                  "or shows no face is replaced by another of the identity."),
        test_fraction: float = typer.Option(0.2, help="Fraction of each identity's images in the test split."),
        seed: int = typer.Option(0, help="Seed of the sampling and the split."),
        detector: Optional[Path] = typer.Option(None, help="Detector ONNX (default: bundled RetinaFace)."),
        det_size: int = typer.Option(640, help="Longer image side seen by the detector (0: native size)."),
        score: float = typer.Option(0.8, help="Detection score threshold."),
        workers: int = typer.Option(1, help="Decoding/detection threads."),
        overwrite: bool = typer.Option(False, help="Replace an existing store."),
        resume: bool = typer.Option(False, help="Continue an interrupted run."),
    ) -> None:
        """Folder-per-identity dataset (VGGFace2, CASIA) -> detected, 5-point aligned face store.

        A FairFace root (train/ and val/ with fairface_label_train.csv / fairface_label_val.csv beside them) keeps
        FairFace's split: train/ -> train, val/ -> test, one identity "unknown".
        """
        from facetool.data.folder import prepare_folder
        from facetool.data.imdbface import report_path

        from facetool import distributed as fd

        with fd.job():  # under torchrun: the images split over the ranks, rank 0 writes
            got = prepare_folder(
                root, out, aligned=aligned, size=size, min_images=min_images, per_identity=per_identity or None,
                test_fraction=test_fraction, seed=seed, detector_model=detector, det_size=det_size or None,
                score=score, workers=workers, overwrite=overwrite, resume=resume,
            )
        if got is None:
            return
        path, rep = got
        _show(f"folder {root.name}", rep, report_path(path))
