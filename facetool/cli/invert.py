"""`facetool invert`: reconstruct faces from a model's embeddings (DeepInversion)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from facetool.cli.common import arch_option, console, dict_table, err_console, fail, features_option, guarded


def register(app: typer.Typer) -> None:
    app.command("invert")(invert_cmd)


@guarded
def invert_cmd(
    model: Path = typer.Option(..., "--model", help="Model checkpoint (the embeddings' model)."),
    out: Path = typer.Option(None, "--out", help="Output folder: inverted.h5, grid.png, metrics.json "
                                                 "(default: runs/invert-<run>-<n>, the next free n)."),
    images: Path = typer.Option(None, "--images", help="Face store (.h5) or folder of aligned crops to invert."),
    embeddings: Path = typer.Option(None, "--embeddings", help="HDF5 with 'embeddings' (N,D) [+ 'images', 'labels']."),
    split: str = typer.Option("test", "--split", help="Store split to take faces from (train/test/all)."),
    limit: int = typer.Option(8, "--limit", help="Number of faces to invert."),
    iterations: int = typer.Option(300, "--iterations", help="Optimisation steps per batch (thesis: 20000)."),
    batch: int = typer.Option(8, "--batch", help="Faces optimised together."),
    lr: float = typer.Option(0.25, "--lr"),
    id_loss: str = typer.Option("cosine", "--id-loss", help="cosine or l2."),
    bn_weight: float = typer.Option(0.01, "--bn-weight", help="Weight of the BN-statistics prior."),
    no_bn_prior: bool = typer.Option(False, "--no-bn-prior", help="Drop the BN prior (models without BatchNorm)."),
    tv_l2: float = typer.Option(1e-3, "--tv-l2"),
    tv_l1: float = typer.Option(0.0, "--tv-l1"),
    l2: float = typer.Option(1e-4, "--l2"),
    gate_prior: float = typer.Option(0.0, "--gate-prior", help="Weight of the AIG gate-pattern prior."),
    routing_prior: float = typer.Option(0.0, "--routing-prior", help="Weight of the routing prior (CondFace models, "
                                        "thesis: 10); > 0 also inverts without it and compares (Table 5.3)."),
    multires: bool = typer.Option(False, "--multires", help="First half of the steps at half resolution."),
    judge: Path = typer.Option(None, "--judge", help="Second model to judge identity (cosine, --pairs)."),
    pairs: bool = typer.Option(False, "--pairs", help="Verification accuracy of inverted vs real pairs."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs in OUT."),
    arch: str = arch_option(),
    features: str = features_option(("embedding", "penultimate", "logits")),
    judge_arch: str = arch_option("--judge-arch", of="--judge"),
    judge_features: str = features_option(flag="--judge-features", of="--judge"),
) -> None:
    """Invert faces: optimise images whose embeddings match the targets, then score them. With
    --routing-prior W (a CondFace model) the faces are inverted twice, without and with W x the distance of
    their routing vectors to the target faces', and the metrics of both are compared (thesis Table 5.3)."""
    from facetool import distributed as fd
    from facetool.io import guard_output, guard_run_folder, run_name

    inputs = (model, images, embeddings, judge)
    fresh = out is None or not Path(out).exists()  # this run creates the folder (removed again if left empty)
    out = guard_run_folder(out, f"invert-{run_name(model)}", inputs=inputs, overwrite=overwrite, resume=resume)
    for name in ("inverted.h5", "grid.png", "metrics.json"):
        guard_output(out / name, inputs=inputs, overwrite=overwrite or resume, option="--out")
    state_dir = out / "state"
    written: list[str] = []
    try:
        with fd.job():  # under torchrun: the batches split over the ranks, rank 0 evaluates and writes
            _invert(model=model, out=out, images=images, embeddings=embeddings, split=split, limit=limit,
                    iterations=iterations, batch=batch, lr=lr, id_loss=id_loss, bn_weight=bn_weight,
                    no_bn_prior=no_bn_prior, tv_l2=tv_l2, tv_l1=tv_l1, l2=l2, gate_prior=gate_prior,
                    routing_prior=routing_prior, multires=multires, judge=judge, pairs=pairs, seed=seed,
                    resume=resume, arch=arch, features=features, judge_arch=judge_arch,
                    judge_features=judge_features, state_dir=state_dir, written=written)
    except KeyboardInterrupt:
        if os.environ.get("FACETOOL_DEBUG"):
            raise
        fail(_interrupted_message(out, state_dir, fresh, written), 130)


def _interrupted_message(out: Path, state_dir: Path, fresh: bool, written: list[str]) -> str:
    """What an interrupted ``invert`` kept, truthfully: the resume state of its batches (written every
    ``save_every`` iterations and at the end of a batch) and the result files it finished, or nothing
    (an empty folder this run made is then removed)."""
    import contextlib

    states = sorted(state_dir.rglob("state-*.pt")) if state_dir.is_dir() else []
    files = f"wrote {', '.join(written)}" if written else "wrote none of inverted.h5, grid.png, metrics.json"
    if states:
        return (f"interrupted; kept the resume state of {len(states)} batch(es) in {state_dir} and {files}: rerun "
                f"the same command with --resume --out {out} to continue")
    if not written:
        for d in (state_dir / NO_PRIOR, state_dir, out if fresh else None):  # only folders this run created, when empty
            with contextlib.suppress(OSError):
                if d is not None and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        return "interrupted before the first resume state was saved; nothing was kept (rerun the command to start over)"
    return f"interrupted; {files}; no resume state is left"


#: the state folder (under OUT/state) of the comparison inversion without the routing prior
NO_PRIOR = "no-routing-prior"
#: what the routing-prior comparison reports (thesis Table 5.3: SSIM, judge cosine, pair accuracy)
COMPARED = ("ssim", "cosine_model", "cosine_judge", "pair_accuracy")


def _invert(*, model: Path, out: Path, images: Path | None, embeddings: Path | None, split: str, limit: int,
            iterations: int, batch: int, lr: float, id_loss: str, bn_weight: float, no_bn_prior: bool, tv_l2: float,
            tv_l1: float, l2: float, gate_prior: float, routing_prior: float, multires: bool, judge: Path | None,
            pairs: bool, seed: int, resume: bool, arch: str | None, features: str, judge_arch: str | None,
            judge_features: str, state_dir: Path, written: list[str]) -> None:
    """The inversion itself, after the options and outputs are checked (``invert_cmd``); appends each
    result file to ``written`` once it is complete. Under ``torchrun`` every rank inverts its share of the
    batches (both inversions with ``--routing-prior``) and gets them all back; rank 0 alone evaluates and
    writes."""
    import torch

    from facetool import distributed as fd
    from facetool.data.transforms import normalize
    from facetool.errors import FacetoolError
    from facetool.io import atomic_path, write_json
    from facetool.explainers import invert as inv
    from facetool.models import load_model

    if state_dir.exists() and not resume and fd.is_main():
        for f in state_dir.rglob("state-*.pt"):
            f.unlink()
    fd.barrier()  # no rank saves a batch's state before the old ones are gone
    cfg = inv.InversionConfig(iterations=iterations, lr=lr, batch=batch, id_loss=id_loss,
                              w_bn=0.0 if no_bn_prior else bn_weight, w_tv_l2=tv_l2, w_tv_l1=tv_l1, w_l2=l2,
                              multires=multires, seed=seed)
    from facetool.models.features import EMBEDDING_FEATURES, select_features

    net = select_features(load_model(model, name=arch), features)
    if routing_prior > 0 and "routing" not in getattr(net, "internal_names", ()):  # before any work
        names = ", ".join(getattr(net, "internal_names", ())) or "nothing"
        raise FacetoolError(f"--routing-prior needs a model with routing vectors (a CondFace model); "
                            f"{getattr(net, 'name', model)} reports: {names}")
    size = int(getattr(net, "config", {}).get("input_size", 112))
    cfg.size = size
    data = inv.load_inputs(images, embeddings, split=None if split == "all" else split, limit=limit, size=size)
    if pairs and data.store is None:
        raise FacetoolError("--pairs needs --images STORE.h5 (real images of the same identities)")
    if routing_prior > 0 and data.images is None:
        raise FacetoolError("--routing-prior needs --images: the routing vectors of the target faces")
    real = normalize(data.images) if data.images is not None else None
    targets = torch.from_numpy(data.embeddings) if data.embeddings is not None else inv.embed(net, real)
    judge_net = None
    if judge is not None:
        judge_net = select_features(load_model(judge, name=judge_arch, option="--judge-arch"), judge_features,
                                    option="--judge-features", allowed=EMBEDDING_FEATURES)
    inv.check_evaluation(data, net, judge_net, pairs, size, seed)  # before the optimisation, not after it

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]invert[/] {task.fields[batch]}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[terms]}"), console=err_console, transient=True,
                    disable=not err_console.is_terminal)
    task = prog.add_task("invert", total=cfg.iterations, batch="", terms="")

    def on_step(k: int, n: int, step: int, terms: dict[str, float]) -> None:
        if step % 5 == 0 or step == cfg.iterations:
            txt = " ".join(f"{a}={b:.3g}" for a, b in terms.items())
            prog.update(task, completed=step, batch=f"batch {k + 1}/{n}", terms=txt)

    def run(weight: float, states: Path):
        """(result, inputs it covers, divergence or None) of one inversion with routing prior ``weight``."""
        try:
            r, bad = inv.invert_batches(net, targets, cfg, target_images=real, gate_weight=gate_prior,
                                        routing_weight=weight, state_dir=states, progress=on_step), None
        except inv.InversionDiverged as e:
            r, bad = e.result, e
        keep = slice(0, len(r.images))
        covered = inv.InversionInputs(
            data.images[keep] if data.images is not None else None, None, data.labels[keep], data.identities,
            data.sources[keep], data.split[keep], data.store, data.rows[keep] if data.rows is not None else None)
        return r, covered, bad

    t0 = time.perf_counter()
    comparison = None
    with prog:
        if routing_prior > 0:  # the same inversion without the prior first: Table 5.3's comparison
            res0, done0, bad0 = run(0.0, state_dir / NO_PRIOR)
            m0 = (inv.evaluate_inversion(res0, done0, net, judge_net, pairs and bad0 is None, seed)
                  if fd.is_main() else {})
            comparison = {"weight": routing_prior,
                          "without": {k: m0[k] for k in ("images", *COMPARED) if k in m0}
                          | {"final_loss": {k: v[-1] for k, v in res0.history.items() if v}}}
            if bad0 is not None:
                comparison["without"]["diverged"] = str(bad0)
        res, done, diverged = run(routing_prior, state_dir)
    seconds = time.perf_counter() - t0
    if not fd.is_main():  # every rank has the inversions; rank 0 evaluates, writes and reports
        return
    n = len(res.images)
    metrics = inv.evaluate_inversion(res, done, net, judge_net, pairs and diverged is None, seed)
    if comparison is not None:
        comparison["with"] = ({k: metrics[k] for k in ("images", *COMPARED) if k in metrics}
                              | {"final_loss": {k: v[-1] for k, v in res.history.items() if v}})
        metrics["routing_prior_comparison"] = comparison
    metrics |= {"model": str(model), "features": features, "judge": str(judge) if judge else None, "seconds": round(seconds, 2),
                "config": {k: v for k, v in vars(cfg).items()}, "final_loss": {k: v[-1] for k, v in res.history.items() if v}}
    if diverged is not None:
        metrics["diverged"] = str(diverged)

    from facetool.store import Record, StoreWriter

    w = StoreWriter(out / "inverted.h5", image_size=(size, size), identities=data.identities, overwrite=True,
                    source=f"facetool invert --model {model}", preprocessing={"inverted_from": str(images or embeddings)})
    try:
        for i, img in enumerate(res.uint8):
            w.append(Record(img, int(done.labels[i]), int(done.split[i]), f"inverted:{done.sources[i]}"))
        w.finalize(extra_attrs={"inversion": metrics["config"]})
    except BaseException:
        w.abort(keep=False)
        raise
    written.append("inverted.h5")
    import cv2

    grid = inv.grid_image(done.images, res.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise FacetoolError(f"cannot encode {out / 'grid.png'}")
    with atomic_path(out / "grid.png") as tmp:
        tmp.write_bytes(png.tobytes())
    written.append("grid.png")
    write_json(out / "metrics.json", metrics)
    written.append("metrics.json")
    if diverged is None:
        for f in state_dir.rglob("state-*.pt"):
            f.unlink()
    rows = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k not in ("model", "judge")}
    console.print(dict_table(f"inversion of {n} faces ({cfg.iterations} iterations)", rows, "metric"))
    if comparison is not None:
        from facetool.cli.common import records_table

        recs = [{"metric": k, "without": comparison["without"].get(k, float("nan")),
                 f"with routing prior {routing_prior:g}": comparison["with"].get(k, float("nan"))}
                for k in COMPARED if k in comparison["with"] or k in comparison["without"]]
        console.print(records_table("routing prior (thesis Table 5.3): the same faces without and with it", recs))
    console.print(f"wrote {out / 'inverted.h5'}, {out / 'grid.png'}, {out / 'metrics.json'}")
    if diverged is not None:
        raise diverged
