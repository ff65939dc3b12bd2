"""`facetool prepare celeba`: CelebA aligned images + annotation files -> 5-point aligned store."""

from __future__ import annotations

from pathlib import Path

import typer

from facetool.cli.common import console, dict_table, guarded


def register(prepare_app: typer.Typer) -> None:
    @prepare_app.command("celeba")
    @guarded
    def celeba(
        root: Path = typer.Option(..., "--root", help="CelebA folder: img_align_celeba/, list_attr_celeba.txt, "
                                                      "list_eval_partition.txt, list_landmarks_align_celeba.txt "
                                                      "[, identity_CelebA.txt] (files may be in Anno/, Eval/)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output store (.h5)."),
        size: int = typer.Option(112, help="Crop size (5-point alignment on the CelebA landmarks)."),
        val_split: str = typer.Option("skip", "--val-split", help="Where CelebA's validation partition goes: skip | train | test."),
        limit: int = typer.Option(0, help="Only the first N usable images (0: all)."),
        workers: int = typer.Option(1, help="Decoding threads."),
        overwrite: bool = typer.Option(False, help="Replace an existing store."),
        resume: bool = typer.Option(False, help="Continue an interrupted run."),
    ) -> None:
        """CelebA -> face store with the 40 binary attributes (no/yes), train/test from the partition file.

        Example: facetool prepare celeba --root data/CelebA --out data/celeba.h5
        """
        from facetool.data.celeba import prepare_celeba
        from facetool.data.imdbface import report_path
        from facetool.io import STORE_SUFFIXES, guard_output

        if not resume:
            guard_output(out, inputs=(root,), overwrite=overwrite, suffix=STORE_SUFFIXES)
        path, rep = prepare_celeba(root, out, size=size, val_split=val_split, limit=limit or None,
                                   overwrite=overwrite, resume=resume, workers=workers)
        rows = [("identities", rep["identities"]), ("images", rep["images"]), ("train", rep["train"]),
                ("test", rep["test"])] + [(f"dropped: {k}", v) for k, v in rep["dropped"].items()]
        console.print(dict_table("CelebA", rows, key="", value="count"))
        console.print(f"store: {rep['store']}  report: {report_path(path)}")
