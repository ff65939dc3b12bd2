"""`facetool eval landmarks`: a FAN's landmark accuracy on a store (NME, AUC@0.08, failure rate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, checked_device, console, device_option, guarded, records_table

HEADERS = ["convention", "images", "NME io %", "AUC@0.08 io", "fail io %", "NME box %", "AUC@0.08 box", "fail box %",
           "mean shape NME io %"]


def register(group: typer.Typer) -> None:
    @group.command("landmarks")
    @guarded
    def landmarks(
        model: Path = typer.Option(..., "--model", help="FAN file: a facetool checkpoint (train fan), a public "
                                                        "2DFAN4 state_dict or TorchScript .zip."),
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5) with dense "
                                   "landmarks. [env FACETOOL_STORE]"),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for landmarks.json and the overlay grid "
                                                               "overlay.png (green: truth, red: prediction)."),
        images: int = typer.Option(24, "--images", help="Faces in the overlay grid."),
        batch_size: int = typer.Option(16, "--batch-size"),
        arch: Optional[str] = arch_option(),
        device: str = device_option("cpu"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace results this command did not write."),
    ) -> None:
        """NME (inter-ocular and box normalisation), AUC@0.08 and failure rate (NME > 0.08) per landmark
        convention of the store, beside the mean-shape baseline; an overlay grid with --out.

        Example: facetool eval landmarks --model runs/fan/model.pt --store data/synthetic.h5 --out runs/fan/eval
        """
        from facetool.errors import FacetoolError, require_file
        from facetool.io import guard_output, write_json

        dev = checked_device(device)
        if split not in ("train", "test", "all"):
            raise FacetoolError(f"--split must be train, test or all, not {split!r}")
        js = png = None
        if out is not None:
            guard_output(out, inputs=(store, model), overwrite=True, is_dir=True, option="--out")
            js, png = out / "landmarks.json", out / "overlay.png"
            for p in (js, png):
                guard_output(p, inputs=(store, model), overwrite=overwrite, option="--out", owner="eval landmarks")
        from facetool.data import face_source
        from facetool.eval.landmarks import evaluate_landmarks, overlay_grid
        from facetool.models import load_model
        from facetool.store import FaceStore

        face_source(store)
        m = load_model(require_file(model, "model"), name=arch)
        if getattr(m, "output_kind", "") != "heatmaps":
            raise FacetoolError(f"--model {model} is a {m.name}, not a landmark model (FAN)")
        res = evaluate_landmarks(m.to(dev), store, None if split == "all" else split, batch_size=batch_size, device=dev)
        rows, public = [], {}
        for conv, r in res.items():
            rows.append({"convention": conv if r["scored_as"] == conv else f"{conv} as {r['scored_as']}",
                         "images": r["images"], "NME io %": 100 * r["nme_io"], "AUC@0.08 io": r["auc_io"],
                         "fail io %": 100 * r["failure_io"], "NME box %": 100 * r["nme_box"],
                         "AUC@0.08 box": r["auc_box"], "fail box %": 100 * r["failure_box"],
                         "mean shape NME io %": 100 * r["mean_shape_nme_io"]})
            public[conv] = {k: v for k, v in r.items() if not k.startswith("_")}
        console.print(records_table(f"landmarks of {model.name} on {store.name} [{split}]", rows, HEADERS))
        if out is not None:
            write_json(js, {"model": str(model), "store": str(store), "split": split, "conventions": public})
            first = next(iter(res.values()))
            k = min(images, len(first["_indices"]))
            if k > 0:
                sel = first["_indices"][:k]
                with FaceStore(store) as s:
                    crops = s.images(sel)
                overlay_grid(crops, first["_pred"][:k], first["_gt"][:k], png)
            console.print(f"results: {js}" + (f", overlay: {png}" if k > 0 else ""))
