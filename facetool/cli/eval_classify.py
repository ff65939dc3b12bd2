"""`facetool eval classify`: identity classification of several models side by side (Table II)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, guarded, records_table

COLUMNS = ["model", "top1", "top5", "attr_acc", "majority", "gflops_executed", "gflops_dense", "params_m", "gate_rate",
           "gate_rate_free", "target_free"]
HEADERS = ["model", "top-1 %", "top-5 %", "attr. acc %", "majority %", "GFLOPs exec.", "GFLOPs dense", "params M",
           "gate rate", "free-block rate", "target"]
ATTR_HEADERS = ["model", "attribute", "acc %", "majority %", "majority value", "train share %", "known"]


def register(group: typer.Typer) -> None:
    @group.command("classify")
    @guarded
    def classify(
        store: Path = typer.Option(..., "--store", envvar="FACETOOL_STORE", help="Face store (.h5) the models were trained on. [env FACETOOL_STORE]"),
        model: list[Path] = typer.Option(..., "--model", help="Checkpoint; repeat for a side-by-side table."),
        split: str = typer.Option("test", "--split", help="train, test or all."),
        batch_size: int = typer.Option(64, "--batch-size", min=1),
        workers: int = typer.Option(0, "--workers", min=0),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON."),
        arch: Optional[list[str]] = typer.Option(None, "--arch", metavar="NAME",
                                                 help="Architecture of each --model file that does not record one "
                                                      "(once per --model, same order), e.g. resnet18."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a --json file this command did not write."),
    ) -> None:
        """Top-1/top-5, executed and dense GFLOPs, parameters and gate rate, one row per model.

        "gate rate" is over all gated blocks; "free-block rate" over the blocks the training --target
        controls (not pinned to 1), beside that "target".
        Attribute models (train --task attribute:NAME|attributes) report the mean attribute accuracy and a
        second table with each attribute's accuracy beside its majority-class baseline. "majority %" is the
        accuracy of always predicting the training split's most frequent class.

        Example: facetool eval classify --store data/imdb.h5 --model runs/resnet/model.pt --model runs/aig/model.pt
        """
        from rich.progress import Progress

        from facetool.data import face_source
        from facetool.eval.classification import compare_classifiers
        from facetool.io import guard_output, write_json
        from facetool.store import FaceStore

        if json_out is not None:
            guard_output(json_out, inputs=(store, *model), overwrite=overwrite, option="--json", owner="eval classify",
                         suffix=".json")

        with FaceStore(face_source(store)) as s:
            n = len(s.indices(split))
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("evaluating", total=n * len(model))
            rows = compare_classifiers(model, store, split, batch_size, workers=workers,
                                       on_batch=lambda k: prog.advance(task, k), archs=arch or None)
        table_rows = []
        for r in rows:
            ck = Path(r["checkpoint"])  # runs/<run>/model.pt -> "<run>"; other files by their stem
            name = f"{ck.parent.name if ck.stem == 'model' else ck.stem}\n{r['model']}"
            table_rows.append({h: (name if c == "model" else ("-" if r[c] is None else r[c]))
                               for c, h in zip(COLUMNS, HEADERS)})
        console.print(records_table(f"classification on {store.name} [{split}]", table_rows, HEADERS))
        attr_rows = []
        for r, tr in zip(rows, table_rows):
            for name, a in (r.get("attributes") or {}).items():
                attr_rows.append({"model": tr["model"].split("\n")[0], "attribute": name, "acc %": a["acc"],
                                  "majority %": a["majority"], "majority value": str(a["majority_value"]),
                                  "train share %": a["train_majority_share"], "known": a["known"]})
        if attr_rows:
            console.print(records_table(f"attributes on {store.name} [{split}]: accuracy vs the majority-class "
                                        "baseline (training split's most frequent value)", attr_rows, ATTR_HEADERS))
        if json_out is not None:
            write_json(json_out, {"store": str(store), "split": split, "models": rows})
            console.print(f"results: {json_out}")
