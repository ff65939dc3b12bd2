"""`facetool eval ijbc|ijbb|lfw|cfp-fp|agedb-30|calfw|cplfw`: the face-recognition protocols."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from facetool.cli.common import (arch_option, checked_device, console, device_option, dict_table, err_console,
                                 features_option, guarded, records_table)

if TYPE_CHECKING:  # numpy only in annotations here; imported by the commands (fast --help)
    import numpy as np

_WORKERS = typer.Option(-1, help="DataLoader workers decoding and aligning images (-1: up to 4).")


def _workers(workers: int) -> int:
    """-1: up to 4 (the range is checked before any work: facetool/cli/limits.py)."""
    return min(4, os.cpu_count() or 1) if workers < 0 else workers


def _guard_results(out_dir: Path, stem: str, owner: str, inputs: tuple, overwrite: bool) -> tuple[Path, Path]:
    """The JSON and PNG of one model's result: named after the run, never another model's file."""
    from facetool.io import guard_output

    js, png = out_dir / f"{stem}.json", out_dir / f"{stem}_roc.png"
    # the folder collects every model's results (so it may exist), but it is never an input folder
    guard_output(out_dir, inputs=inputs, overwrite=True, is_dir=True, option="--out")
    for p in (js, png):
        guard_output(p, inputs=inputs, overwrite=overwrite, option="--out", owner=owner)
    return js, png


def _load(model: Path, arch: Optional[str], features: str) -> Any:
    from facetool.errors import require_file
    from facetool.models import load_model
    from facetool.models.features import EMBEDDING_FEATURES, select_features

    return select_features(load_model(require_file(model, "model"), name=arch), features, allowed=EMBEDDING_FEATURES)


def _input_note(res: dict) -> str:
    """The line saying at which size the model saw the faces."""
    if res["input_size"] == res["crop_size"]:
        return f"model input {res['input_size']} px (the aligned crops as they are)"
    return f"model input {res['input_size']} px: the aligned {res['crop_size']}-px crops were resized to it"


class _Progress:
    """A rich progress bar for ``progress(done, total)`` callbacks (silent when not a terminal)."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True, disable=not err_console.is_terminal)
        self.task = None

    def __enter__(self) -> "_Progress":
        self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.p.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.p.add_task("", total=total)
        self.p.update(self.task, completed=done)


def _roc_png(path: Path, fpr: np.ndarray, tpr: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facetool.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4))
    m = fpr > 0
    ax.plot(fpr[m], tpr[m], lw=1.5)
    ax.set_xscale("log")
    lo = float(fpr[m].min()) if m.any() else 1e-6
    ax.set_xlim(min(max(lo, 1e-6), 1e-1), 1)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _ijb(prefix: str):
    title = {"ijbc": "IJB-C", "ijbb": "IJB-B"}[prefix]

    def cmd(
        root: Path = typer.Option(..., "--root", help="IJB folder with meta/ and loose_crop/ (insightface layout)."),
        model: Path = typer.Option(..., "--model", help="facetool checkpoint, arcface_torch backbone.pth or .onnx."),
        batch_size: int = typer.Option(256, "--batch-size", min=1),
        no_norm: bool = typer.Option(False, "--no-norm", help="Drop each image feature's norm (insightface N0: L2-normalise it before pooling). Default N1 keeps the norm, a quality weight in the template average."),
        no_det_score: bool = typer.Option(False, "--no-det-score", help="Do not weight by the faceness score (D0)."),
        no_flip: bool = typer.Option(False, "--no-flip", help="Do not add the flipped crop's feature (F0)."),
        cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 feature cache: reruns skip extraction."),
        out: Optional[Path] = typer.Option(None, "--out", help=f"Output folder (default eval/{prefix}); files are "
                                                                "named after the run: runs/a/model.pt -> a_model_N1D1F1.json."),
        one_to_n: bool = typer.Option(False, "--one-to-n", help="Also run 1:N search (NIST gallery/probe CSVs)."),
        device: str = device_option("auto"),
        workers: int = _WORKERS,
        arch: Optional[str] = arch_option(),
        features: str = features_option(),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace result files this command did not write."),
    ) -> None:
        from facetool import distributed as fd
        from facetool.eval.embed import check_cache
        from facetool.eval.ijb import evaluate_ijb
        from facetool.io import run_name, write_json

        dev = checked_device(device)
        out_dir = out or Path("eval") / prefix
        stem = run_name(model)
        sw = f"N{int(not no_norm)}D{int(not no_det_score)}F{int(not no_flip)}"
        inputs = (root, model, cache)
        js, png = _guard_results(out_dir, f"{stem}_{sw}", f"eval {prefix} {Path(model).resolve()}", inputs, overwrite)
        if cache is not None:
            check_cache(cache, inputs=(root, model, js, png))
        workers = _workers(workers)
        m = _load(model, arch, features)
        with fd.job(), _Progress(f"{prefix} features") as prog:  # under torchrun: extraction split over the ranks
            res = evaluate_ijb(m, root, prefix=prefix, model_path=model, batch_size=batch_size, norm=not no_norm,
                               det_score=not no_det_score, flip=not no_flip, device=dev,
                               workers=workers, cache=cache, one_to_n=one_to_n, progress=prog, sharded=True)
        if res is None:  # another rank's share, merged and written by rank 0
            return
        fpr, tpr = res.pop("roc")
        res["model"] = str(model)
        _roc_png(png, fpr, tpr, f"{title} 1:1 {stem} ({sw})")
        write_json(js, {**res, "roc_png": str(png)})
        rows = [{"FAR": k, "TAR (closest)": 100 * v["closest"], "TAR (interp)": 100 * v["interp"],
                 "FPR used": v["fpr"]} for k, v in res["tar_at_far"].items()]
        console.print(records_table(f"{title} 1:1 {stem} {sw}: {res['templates']} templates, "
                                    f"{res['pairs']} pairs", rows))
        if "one_to_n" in res:
            one = res["one_to_n"]
            metrics = [k for k in one["G1"] if k not in ("probes", "mated_probes")]
            console.print(records_table(f"{title} 1:N mixed-media search (%)", [
                {"metric": k, **{g: 100 * one[g][k] for g in one}} for k in metrics]))
        console.print(_input_note(res))
        console.print(f"extracted {res['images_extracted']} of {res['images']} images"
                      f"{' (cache ' + str(cache) + ')' if cache else ''}; wrote {js} and {png}")

    cmd.__doc__ = f"{title} 1:1 verification (TAR@FAR, insightface protocol) and optional 1:N search."
    return guarded(cmd)


def _verification(name: str):
    def cmd(
        model: Path = typer.Option(..., "--model", help="facetool checkpoint, arcface_torch backbone.pth or .onnx."),
        bin: Optional[Path] = typer.Option(None, "--bin", help=f"insightface pack {name}.bin."),
        pairs: Optional[Path] = typer.Option(None, "--pairs", help="LFW-style pairs.txt (with --images)."),
        images: Optional[Path] = typer.Option(None, "--images", help="Folder of Name/Name_0001.jpg images."),
        aligned: bool = typer.Option(False, "--aligned", help="--images are already aligned crops (no detection)."),
        batch_size: int = typer.Option(128, "--batch-size", min=1),
        out: Optional[Path] = typer.Option(None, "--out", help=f"Output folder (default eval/{name}); files are "
                                                                "named after the run: runs/a/model.pt -> a_model.json."),
        device: str = device_option("auto"),
        workers: int = _WORKERS,
        arch: Optional[str] = arch_option(),
        features: str = features_option(),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace result files this command did not write."),
    ) -> None:
        from facetool import distributed as fd
        from facetool.errors import FacetoolError
        from facetool.eval import verification as V
        from facetool.eval.roc import roc
        from facetool.io import run_name, write_json

        out_dir = out or Path("eval") / name
        stem = run_name(model)
        js, png = _guard_results(out_dir, stem, f"eval {name} {Path(model).resolve()}", (model, bin, pairs, images),
                                 overwrite)
        if (bin is None) == (pairs is None) or (pairs is not None and images is None):
            raise FacetoolError("give either --bin PACK.bin or --pairs pairs.txt --images FOLDER")
        dev, nw = checked_device(device), _workers(workers)
        m = _load(model, arch, features)
        with fd.job(), console.status(f"{name}: extracting embeddings"):  # under torchrun: split over the ranks
            if bin is not None:
                res = V.verify_bin(m, bin, batch_size, dev, nw, sharded=True)
            else:
                res = V.verify_pairs(m, pairs, images, aligned=aligned, batch_size=batch_size, device=dev, workers=nw,
                                     sharded=True)
        if res is None:  # another rank's share, merged and reported by rank 0
            return
        dist, issame = res.pop("distances"), res.pop("issame")
        res.update(set=name, model=str(model))
        fpr, tpr, _ = roc(issame, -dist)
        _roc_png(png, fpr, tpr, f"{name} {stem}")
        write_json(js, {**res, "roc_png": str(png)})
        console.print(dict_table(f"{name} verification: {stem} ({res['pairs']} pairs, {res['folds']} folds)", [
            ("accuracy (%)", f"{100 * res['accuracy']:.2f} ± {100 * res['std']:.2f}"),
            ("best threshold (all pairs)", f"{res['best_threshold']:.2f}"),
            ("accuracy at best threshold (%)", f"{100 * res['best_threshold_accuracy']:.2f}"),
            ("XNorm", f"{res['xnorm']:.3f}"),
        ], "metric"))
        console.print(_input_note(res))
        console.print(f"wrote {js} and {png}")

    cmd.__doc__ = f"{name} verification accuracy (arcface_torch 10-fold protocol) from a .bin or pairs.txt."
    return guarded(cmd)


def register(app: typer.Typer) -> None:
    from facetool.eval import BIN_SETS

    for prefix in ("ijbc", "ijbb"):
        app.command(prefix)(_ijb(prefix))
    for name in BIN_SETS:
        app.command(name)(_verification(name))
