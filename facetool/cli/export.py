"""`facetool export`: a trained model to ONNX (insightface-loadable for recognition models)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import arch_option, console, dict_table, features_option, guarded


def register(app: typer.Typer) -> None:
    @app.command("export")
    @guarded
    def export(
        model: Path = typer.Option(..., "--model", help="facetool checkpoint or arcface_torch backbone.pth."),
        out: Path = typer.Option(None, "--out", help="Output .onnx file (a .json report is written beside it; "
                                                     "default: <run>.onnx beside the checkpoint, runs/a/model.pt -> runs/a/a_model.onnx)."),
        opset: int = typer.Option(17, "--opset", help="ONNX opset version (7..20)."),
        dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Variable batch size (default: batch 1)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
        arch: Optional[str] = arch_option(),
        features: str = features_option(("embedding", "penultimate", "logits")),
    ) -> None:
        """Export a model to ONNX and verify it against PyTorch with ONNX Runtime."""
        from facetool.export import check_export_options, export_onnx, report_path
        from facetool.io import guard_output, run_name

        if out is None:
            out = model.parent / f"{run_name(model)}.onnx"
        check_export_options(out, opset)
        guard_output(out, inputs=(model,), overwrite=overwrite, option="--out")
        guard_output(report_path(out), inputs=(model, out), overwrite=overwrite, option="--out (report)",
                     owner=f"export {out.resolve()}")
        report = export_onnx(model, out, opset=opset, dynamic_batch=dynamic_batch, features=features, arch=arch)
        rows = {k: report[k] for k in ("onnx", "opset", "dynamic_batch", "input_size", "output", "output_size",
                                       "max_abs_diff_normalised", "insightface_recognition")}
        console.print(dict_table("ONNX export", rows))
        if report["output"] == "logits":
            console.print("note: the output is the class logits (named 'logits'), not a face embedding")
        elif not report["insightface_recognition"]:
            console.print("[yellow]note:[/] insightface routes only square inputs >= 112 px (multiple of 16) "
                          "to recognition")
