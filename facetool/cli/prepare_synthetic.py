"""`facetool prepare synthetic`: render a synthetic face store with known attributes and parts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facetool.cli.common import console, dict_table, guarded
from facetool.data.synthetic_spec import BIAS_HELP


def register(prepare_app: typer.Typer) -> None:
    @prepare_app.command("synthetic")
    @guarded
    def synthetic(
        out: Path = typer.Option(Path("data/synthetic.h5"), "--out", "-o", help="Output face store (.h5)."),
        identities: int = typer.Option(20, "--identities", min=1, help="Number of identities."),
        per_identity: int = typer.Option(40, "--per-identity", min=1, help="Images per identity."),
        size: int = typer.Option(112, "--size", help="Image size in pixels (square, 32..1024)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives bit-identical images."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of each identity's images in the test split."),
        bias: Optional[str] = typer.Option(None, "--bias", help=BIAS_HELP),
        grid: Optional[Path] = typer.Option(None, "--grid", help="Example grid PNG (default: <out>.grid.png)."),
        workers: int = typer.Option(1, "--workers", min=1, help="Rendering threads."),
        landmarks: bool = typer.Option(True, "--landmarks/--no-landmarks",
                                       help="Store the iBUG 68-point landmarks of every image (with visibility) "
                                            "beside the 5 alignment points; the images are the same either way."),
        pose: str = typer.Option("default", "--pose", help="Head-pose range: default (|yaw| <= 40, |pitch| <= 25) | "
                                 "wide (yaw sd 40 up to 75, pitch sd 30 up to 55: the cohort code's pose bins vary)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (same options)."),
    ) -> None:
        """Render synthetic faces: identities with gender/skin/eye colour/facial hair/age/group
        attributes, 5 alignment landmarks and iBUG 68-point landmarks, part masks and pose; optionally a planted
        accessory bias. Writes the store, a
        report beside it (data/x.h5 -> data/x.json) and an example grid; a size that cannot fit (over 10 M images,
        1 M identities, or the free disk) is refused with its estimate before anything is written.

        Example: facetool prepare synthetic --identities 20 --per-identity 40 --out data/synthetic.h5
        """
        from facetool.data.synthetic import prepare_synthetic, save_grid
        from facetool.io import STORE_SUFFIXES, guard_output

        grid = grid if grid is not None else out.with_name(out.name + ".grid.png")
        guard_output(out, overwrite=overwrite or resume, suffix=STORE_SUFFIXES)
        guard_output(grid, inputs=(out,), overwrite=overwrite, option="--grid", suffix=".png", owner=f"prepare synthetic {out.resolve()}")
        path, s = prepare_synthetic(
            out, identities=identities, per_identity=per_identity, size=size, seed=seed,
            test_fraction=test_fraction, bias=bias, overwrite=overwrite, resume=resume, workers=workers, pose=pose,
            landmarks=landmarks,
        )
        rows: list[tuple[str, object]] = [
            ("images", s["images"]), ("identities", s["identities"]), ("train", s["train"]), ("test", s["test"]),
            ("image size", "x".join(map(str, s["image_size"]))),
        ]
        for name, counts in s["attributes"].items():
            rows.append((name, ", ".join(f"{k} {v}" for k, v in counts.items() if k != "unknown" or v)))
        rows.append(("parts", ", ".join(s["parts"])))
        for conv, d in s.get("landmark_sets", {}).items():
            rows.append(("landmarks", f"{conv}: {d['points']} points, {100 * d['visible']:.1f}% visible"))
        console.print(dict_table(f"synthetic store {path}", rows))
        png = save_grid(path, grid)
        console.print(f"example grid: {png}")
