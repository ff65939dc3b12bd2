"""The one place that validates the numbers a user types, before any work.

Every numeric option of every command has a declared range here: by option name (``"--epochs"``), or by
command and option (``"dissect units --limit"``) where a command gives the name another meaning.
:func:`facetool.cli.common.guarded` checks each numeric argument against its range before the command
body runs: NaN and infinity are never accepted, and neither is a value outside its range ("absurd
numbers": a 100000-pixel input, 10^12 epochs). ``tests/test_bad_input_matrix.py`` walks the CLI and
fails for a numeric option without a range, so a new option cannot skip this.

Ranges say what can work at all; an option's own code may refuse more in context (``--warmup-epochs``
must stay below ``--epochs``, an IR-ResNet needs an input size divisible by 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from facetool.errors import FacetoolError
from facetool.io import file_head, is_hdf5_head, is_torch_head

REC_MAGIC = b"\x0a\x23\xd7\xce"  # facetool.data.recordio.MAGIC_BYTES (not imported: --help stays light)


@dataclass(frozen=True)
class Range:
    """``lo <= value <= hi`` (``lo_open`` / ``hi_open``: strict); ``note`` says what a special value means."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        """``in [1, 100000]``, ``in (0, 100]`` ... (interval notation) with the note."""

        def num(x: float) -> str:
            return f"{int(x)}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

        interval = f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return f"in {interval}" + (f" ({self.note})" if self.note else "")


BIG = 10**9  # counts (images, steps, identities) beyond any data set this tool will meet
WEIGHT = Range(0, 1e9, note="a loss weight")
PROB = Range(0, 1)

#: option -> range (every command); "command --option" -> range (that command only)
LIMITS: dict[str, Range] = {
    # training mechanics (facetool/cli/options.py)
    "--epochs": Range(1, 100_000),
    "--batch-size": Range(1, 65_536),
    "--lr": Range(0, 100, lo_open=True),
    "--lr-gamma": Range(0, 1, lo_open=True, note="the step schedule's factor"),
    "--momentum": Range(0, 1, hi_open=True),
    "--weight-decay": Range(0, 1),
    "--warmup-epochs": Range(0, 100_000),
    "--grad-clip": Range(0, 1e9, note="0 = off"),
    "--workers": Range(0, 256, note="0 = load in the main process"),
    "--seed": Range(0, 2**32 - 1),
    "--val-every": Range(1, 100_000),
    "--val-fraction": Range(0, 1, hi_open=True, note="held-out share of each identity of a RecordIO pack"),
    "--log-every": Range(0, BIG, note="0 = never"),
    "--max-steps": Range(0, BIG, note="0 = all epochs"),
    # models
    "--input-size": Range(16, 1024, note="pixels"),
    "--width": Range(1, 1024, note="base channels"),
    "--embedding-size": Range(2, 8192),
    "--gate-hidden": Range(1, 4096),
    "--att-channels": Range(0, 4096, note="0 = the number of outputs, as in the paper"),
    "--scale": Range(0, 1024, lo_open=True, note="the margin head's s"),
    # methods
    "--target": Range(0, 1, note="an execution rate"),
    "--target-weight": WEIGHT,
    "--iig-weight": WEIGHT,
    "--attention-weight": WEIGHT,
    "--alpha": WEIGHT,
    "--beta": WEIGHT,
    "--gamma": WEIGHT,
    "--temperature": Range(0, 1000, lo_open=True),
    "--teacher-scale": Range(0, 1024, lo_open=True, note="the teacher head's s"),
    "--unlabeled-weight": WEIGHT,
    "--mixup": Range(0, 100, note="Beta(A, A); 0 = off"),
    "--labeled-per-identity": Range(1, BIG),
    "--prototypes": Range(2, 1_000_000, note="clusters"),
    "--lambda": WEIGHT,
    # data
    "--size": Range(16, 1024, note="pixels"),
    "--identities": Range(1, 1_000_000),
    "--per-identity": Range(1, 10_000_000),
    "--min-images": Range(1, 10_000_000),
    "--test-fraction": Range(0, 1, hi_open=True),
    "--det-size": Range(32, 4096, note="pixels"),
    "--score": PROB,
    "--limit": Range(1, BIG),
    "prepare celeba --limit": Range(0, BIG, note="0 = all"),
    "prepare folder --per-identity": Range(0, 10_000_000, note="0 = all"),
    # prepare synthetic checks its sizes against the disk itself, with the estimate in the message
    "prepare synthetic --identities": Range(1, BIG),
    "prepare synthetic --per-identity": Range(1, BIG),
    "prepare synthetic --workers": Range(1, 256, note="rendering threads"),
    "prepare imdb-face --per-identity": Range(0, 10_000_000, note="0 = all"),
    **{f"eval {c} --workers": Range(-1, 256, note="-1 = up to 4, 0 = the main process")
       for c in ("lfw", "cfp-fp", "agedb-30", "calfw", "cplfw", "ijbb", "ijbc")},
    # evaluation, export
    "--opset": Range(7, 20),
    # explainers
    "--images": Range(0, 10_000),
    "--max-heads": Range(1, 1000),
    "--identities-shown": Range(1, 10_000),
    "--fraction": Range(0, 1, lo_open=True),
    "--patch": Range(1, 1024, note="pixels"),
    "--steps": Range(1, 10_000),
    "--max-fraction": Range(0, 1, lo_open=True),
    "--grid": Range(1, 1000),
    "--quantile": Range(0, 1, lo_open=True, hi_open=True),
    "--iou-threshold": Range(0, 1, lo_open=True),
    "--top-images": Range(1, 64),
    "--max-units": Range(0, 100_000),
    "dissect gates --identities": Range(1, 100_000),
    "dissect gates --per-identity": Range(1, 100_000),
    "--iterations": Range(1, 10_000_000),
    "--batch": Range(1, 65_536),
    "--bn-weight": WEIGHT,
    "--tv-l2": WEIGHT,
    "--tv-l1": WEIGHT,
    "--l2": WEIGHT,
    "--gate-prior": WEIGHT,
    "--routing-prior": WEIGHT,
    # dissect routing (CondFace, Table 5.1)
    "dissect routing --max-images": Range(2, BIG, note="images clustered"),
    # recipes
    "--from-step": Range(1, 100_000),
    # prepare landmarks (FAN-Face, issue 19)
    "prepare landmarks --margin": Range(0, 4, note="a fraction of the landmarks' box"),
    # FAN (train fan, eval landmarks)
    "--stacks": Range(1, 4, note="hourglasses"),
    "--sigma": Range(0, 64, lo_open=True, note="heatmap cells"),
    "train fan --peak": Range(0, 1e4, lo_open=True, note="target heatmap maximum"),
    "eval landmarks --images": Range(0, 1000, note="faces in the overlay grid; 0 = none"),
    # scale-out: PartialFC
    "--partial-fc": Range(0, 1, lo_open=True, note="PartialFC's sample rate; 1 = every class centre"),
    # dissect counterfactual (issue 21)
    "dissect counterfactual --pairs": Range(1, 1_000_000, note="faces rendered twice"),
    "dissect counterfactual --bootstrap": Range(0, 1_000_000, note="0 = no intervals"),
    "dissect counterfactual --shown": Range(1, 1000),
}


def limit_for(command: str, option: str) -> Range | None:
    """The declared range of ``option`` in ``command`` (e.g. ``"train resnet"``, ``"--epochs"``)."""
    return LIMITS.get(f"{command} {option}", LIMITS.get(option))


def check_number(command: str, option: str, value: Any) -> None:
    """Refuse NaN, infinity and values outside the declared range, naming the option and the range."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    rng = limit_for(command, option)
    if rng is None:
        if not math.isfinite(value):
            raise FacetoolError(f"{option} must be a finite number, got {value}")
        return
    if not rng.contains(value):
        raise FacetoolError(f"{option} must be {rng.describe()}, got {value}")


# -- paths ---------------------------------------------------------------------------------------------
#: what each path option must name. Inputs are checked before any work (exists, file or folder, and a
#: cheap look at the first bytes); outputs go through facetool.io.guard_output in the command.
STORE, MODEL, FILE, FOLDER, BIN, STORE_OR_FOLDER, STORE_OR_MODEL, OUTPUT = (
    "store", "model", "file", "folder", "bin", "store-or-folder", "store-or-model", "output")

PATHS: dict[str, str] = {
    "--store": STORE, "--transfer": STORE, "--unlabeled": STORE_OR_FOLDER, "invert --images": STORE_OR_FOLDER,
    "--model": MODEL, "--teacher": MODEL, "--judge": MODEL, "--from-model": MODEL, "--init": MODEL,
    "--compare": MODEL, "--detector": MODEL,
    "--teacher-head": FILE, "--pairs": FILE, "--csv": FILE, "--dictionary": FILE, "--masks": FILE,
    "--fairface": FILE, "--embeddings": FILE, "annotate csv": FILE, "recipe path": FILE,
    "--bin": BIN, "--val-bin": BIN,
    "--images": FOLDER, "--root": FOLDER, "--run": FOLDER, "prepare folder root": FOLDER,
    "info path": STORE_OR_MODEL,
    "prepare landmarks --list": FILE,  # FAN-Face (issue 19)
    "--out": OUTPUT, "--json": OUTPUT, "--grid": OUTPUT, "--cache": OUTPUT,
}

# -- scale-out: RecordIO packs (.rec with its .idx) ------------------------------------------------------------
REC, STORE_OR_REC = "rec", "store-or-rec"
#: the commands whose --store opens model inputs through facetool.data.open_dataset (a pack is read directly)
REC_STORE_COMMANDS = ("train resnet", "train aig", "train abn", "train arcface", "train condface", "distill")
PATHS.update({"prepare rec --rec": REC, "info path": STORE_OR_MODEL,
              **{f"{c} --store": STORE_OR_REC for c in REC_STORE_COMMANDS}})

#: what the missing thing is called in "... not found" (by option; else by kind)
_NOUN = {"--teacher": "teacher", "--model": "model", "--judge": "judge model", "--from-model": "model",
         "--compare": "model", "--init": "--init checkpoint", "--detector": "detector model",
         "--store": "face store", "--transfer": "transfer store", "--unlabeled": "unlabeled images",
         "--root": "dataset folder", "ROOT": "dataset folder", "--run": "run folder", "--images": "images",
         "--bin": "verification pack", "--val-bin": "verification pack", "--pairs": "pairs file", "--csv": "CSV file",
         "CSV": "annotation CSV", "--fairface": "FairFace CSV", "--dictionary": "dictionary CSV", "--masks": "masks file",
         "--embeddings": "embeddings file", "--teacher-head": "teacher head", "PATH": "file",
         "--rec": "RecordIO pack"}
_WHAT = {STORE: "a face store (HDF5, written by facetool prepare)",
         MODEL: "a model file (a facetool checkpoint, a PyTorch state_dict or an .onnx file)",
         BIN: "an insightface .bin verification pack", FILE: "a file", FOLDER: "a folder",
         STORE_OR_FOLDER: "a face store (HDF5) or a folder of images",
         STORE_OR_MODEL: "a face store (HDF5), a RecordIO pack (.rec) or a model file",
         REC: "a RecordIO pack (.rec, with its .idx beside it)",
         STORE_OR_REC: "a face store (HDF5, written by facetool prepare) or a RecordIO pack (.rec with its .idx)"}


def path_kind(command: str, option: str) -> str | None:
    """The declared kind of a path option (``None``: undeclared)."""
    return PATHS.get(f"{command} {option}", PATHS.get(option))


def _looks_like(kind: str, p) -> bool:
    head = file_head(p)
    if kind == STORE:
        return is_hdf5_head(head)
    if kind == MODEL:
        if str(p).lower().endswith(".onnx"):
            return len(head) > 0 and not is_hdf5_head(head)
        return is_torch_head(head)
    if kind == BIN:
        return head.startswith(b"\x80")  # a pickle
    if kind == REC:
        return head[:4] == REC_MAGIC
    if kind == STORE_OR_REC:
        return _looks_like(STORE, p) or _looks_like(REC, p)
    if kind == STORE_OR_MODEL:
        return _looks_like(STORE, p) or _looks_like(REC, p) or _looks_like(MODEL, p)
    return True


def check_path(command: str, option: str, value: Any) -> None:
    """An input path exists, is a file or a folder as declared, and its first bytes fit its kind."""
    from pathlib import Path

    kind = path_kind(command, option)
    if value is None or kind in (None, OUTPUT) or str(value) == "":
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        p = Path(v)
        name = option if option.startswith("--") else option.upper()
        if not p.exists():
            raise FacetoolError(f"{name}: {_NOUN.get(name, kind)} not found: {p}")
        if kind == FOLDER:
            if not p.is_dir():
                raise FacetoolError(f"{name} {p} is a file; expected a folder")
            continue
        if p.is_dir():
            if kind == STORE_OR_FOLDER:
                continue
            raise FacetoolError(f"{name} {p} is a folder; expected {_WHAT[kind]}")
        try:
            ok = _looks_like(STORE if kind == STORE_OR_FOLDER else kind, p)
        except OSError as e:
            raise FacetoolError(f"{name} {p}: cannot read it ({e.strerror or e})") from None
        if not ok:
            if kind in (STORE, STORE_OR_FOLDER) and file_head(p)[:4] == REC_MAGIC:
                raise FacetoolError(f"{name} {p} is a RecordIO pack; this command reads a face store: convert it "
                                    "with `facetool prepare rec --rec PACK --out STORE.h5`")
            if kind in (MODEL, BIN) and is_hdf5_head(file_head(p)):
                raise FacetoolError(f"{name} {p} is an HDF5 file (a face store or feature cache), not {_WHAT[kind]}")
            raise FacetoolError(f"{name} {p} is not {_WHAT[kind]}: corrupt, or another kind of file")

# -- FAN-Face (train fanface): the frozen FAN file; the store may be a RecordIO pack (train arcface's data path)
PATHS.update({"--fan": MODEL, "train fanface --store": STORE_OR_REC})
_NOUN["--fan"] = "FAN file"
