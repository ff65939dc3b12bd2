"""`facetool dissect counterfactual`: the change of a model's output when only one generator-controlled
concept changes (the direct measurement of a planted bias)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from facetool.cli.common import arch_option, checked_device, console, device_option, guarded, records_table


def register(group: typer.Typer) -> None:
    @group.command("counterfactual")
    @guarded
    def counterfactual_cmd(
        model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint to measure."),
        compare: Optional[List[Path]] = typer.Option(
            None, "--compare", help="Several checkpoints, ranked by the effect: --compare a.pt b.pt (or --compare "
            "a.pt --compare b.pt)."),
        store: Optional[Path] = typer.Option(None, "--store", envvar="FACETOOL_STORE",
                                             help="A synthetic store (facetool prepare synthetic): its recorded "
                                             "generator re-renders each face with and without the concept. "
                                             "[env FACETOOL_STORE]"),
        concept: str = typer.Option("accessory", "--concept",
                                    help="What changes: accessory (glasses), smile or beard."),
        pairs: int = typer.Option(64, "--pairs", help="Faces rendered with the concept off and on (balanced over "
                                  "identities, seeded)."),
        output: str = typer.Option("class", "--output", help="class (probability of the true class), attribute "
                                   "(probability of --attribute NAME[=VALUE]) or embedding (1 - cosine of the pair)."),
        attribute: Optional[str] = typer.Option(None, "--attribute", metavar="NAME[=VALUE]",
                                                help="With --output attribute: the attribute head and value "
                                                "(default: each face's true value), e.g. gender=male."),
        subgroups: Optional[str] = typer.Option(None, "--subgroups", metavar="ATTR",
                                                help="Report the effect per value of this store attribute too."),
        split: str = typer.Option("all", "--split", help="Store split the faces come from: train, test or all."),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals "
                                      "(0 = none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the face sample and the bootstrap."),
        batch_size: int = typer.Option(64, "--batch-size"),
        shown: int = typer.Option(8, "--shown", help="Pairs drawn in pairs.png."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder: counterfactual.json, effects.csv, "
                                           "pairs.csv, pairs.png."),
        device: str = device_option("cpu"),
        arch: Optional[str] = arch_option(of="--model/--compare"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder's files."),
        extra: Optional[List[str]] = typer.Argument(None, hidden=True),
    ) -> None:
        """Render faces of a synthetic store twice, same identity, pose, lighting and noise, with only --concept
        changed, and measure how each model's output moves (per --subgroups value, with bootstrap intervals);
        with --compare, rank the models by the effect.

        Example: facetool dissect counterfactual --compare runs/biased/model.pt runs/clean/model.pt --store data/dict.h5 --output attribute --attribute gender=male --subgroups gender --out cf/
        """
        from facetool.errors import FacetoolError
        from facetool.explainers.counterfactual import counterfactual
        from facetool.io import guard_output

        device = checked_device(device)
        cmp = list(compare or []) + [Path(e) for e in (extra or [])]
        if out is not None:
            guard_output(out, inputs=(model, *cmp, store), overwrite=overwrite, is_dir=True)
        if extra and not compare:
            raise FacetoolError(f"unexpected argument {extra[0]!r}")
        if cmp and model is not None:
            raise FacetoolError("give either --model or --compare, not both")
        if compare is not None and len(cmp) < 2:
            raise FacetoolError(f"--compare needs two or more checkpoints, got {len(cmp)}")
        if store is None:
            raise FacetoolError("--store is required (a synthetic store; or set FACETOOL_STORE)")
        models = cmp or ([model] if model is not None else [])
        with console.status(f"rendering {pairs} {concept} pairs and scoring"):
            res = counterfactual(models, store, out, concept_name=concept, pairs=pairs, output=output,
                                 attribute=attribute, subgroups=subgroups, split=split, bootstrap=bootstrap,
                                 seed=seed, batch_size=batch_size, shown=shown, device=device, arch=arch,
                                 overwrite=overwrite)
        recs = []
        for rank, name in enumerate(res["ranking"], 1):
            m = res["models"][name]
            ci = lambda lo, hi: "" if lo != lo else f"[{lo:+.3f}, {hi:+.3f}]"  # noqa: E731  (nan: no bootstrap)
            recs.append({"rank": rank, "model": name, "subgroup": "all", "pairs": m["n"], "mean change": m["effect"],
                         "95% CI": ci(m["ci_low"], m["ci_high"]), "mean |change|": m["abs_effect"],
                         "|change| 95% CI": ci(m["abs_ci_low"], m["abs_ci_high"])})
            for g, s in m["subgroups"].items():
                recs.append({"rank": "", "model": "", "subgroup": g, "pairs": s["n"], "mean change": s["effect"],
                             "95% CI": ci(s["ci_low"], s["ci_high"]), "mean |change|": s["abs_effect"],
                             "|change| 95% CI": ci(s["abs_ci_low"], s["abs_ci_high"])})
        console.print(records_table(f"counterfactual {res['concept']} ({res['concept_description']}): change of the "
                                    f"{res['score']} ({res['change']}), {res['pairs']} pairs", recs))
        if out is not None:
            console.print(f"wrote {', '.join(res['files'])} to {out}")
