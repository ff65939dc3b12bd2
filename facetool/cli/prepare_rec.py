"""`facetool prepare rec`: an MXNet RecordIO pack (MS1MV3, Glint360K, WebFace42M) -> face store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import guarded


def register(prepare_app: typer.Typer) -> None:
    @prepare_app.command("rec")
    @guarded
    def rec(
        rec: Path = typer.Option(..., "--rec", help="The pack's .rec (its .idx beside it; `property` optional)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output store (.h5)."),
        identities: Optional[int] = typer.Option(None, "--identities", help="Convert this many identities, drawn "
                                                 "with --seed (default: all)."),
        per_identity: Optional[int] = typer.Option(None, "--per-identity", help="At most this many images per "
                                                   "identity, drawn with --seed (default: all)."),
        size: Optional[int] = typer.Option(None, "--size", help="Resize the crops to this size (default: the pack's, "
                                           "112)."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Fraction of each identity's images in the "
                                            "test split (0.2 with seed 0: the split `--store X.rec` uses)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the identity and image draws and of the split."),
        overwrite: bool = typer.Option(False, help="Replace an existing store."),
        resume: bool = typer.Option(False, help="Continue an interrupted run."),
    ) -> None:
        """RecordIO pack (.rec/.idx, insightface's training sets) -> face store, images copied (already aligned)."""
        from facetool import distributed as fd
        from facetool.cli.prepare_datasets import _show
        from facetool.data.imdbface import report_path
        from facetool.data.rec_prepare import prepare_rec

        with fd.job():  # under torchrun: the records split over the ranks, rank 0 writes
            got = prepare_rec(rec, out, identities=identities, per_identity=per_identity, size=size,
                              test_fraction=test_fraction, seed=seed, overwrite=overwrite, resume=resume)
        if got is None:
            return
        path, rep = got
        _show(f"rec {rec.name}", rep, report_path(path))
