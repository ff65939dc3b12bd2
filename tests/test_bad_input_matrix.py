"""The bad-input matrix (#17): every option of every command, walked from the Typer app, gets bad values.

* every numeric option: NaN, inf, -1, 0 and an absurd value (10^12); a value inside the option's
  declared range (facetool/cli/limits.py) is valid by declaration and not run;
* every input path option: a missing file, a folder where a file belongs (a file where a folder belongs),
  a text file with the expected suffix, and the command's other inputs of another kind.

Each bad value must give exit 2, ONE line naming the option (or its path), no traceback, no "internal
error", nothing written, and every input unchanged (sha256). The checks run before any work, so the
commands are invoked in this process against placeholder inputs that pass them (a real tiny face store,
a real checkpoint ...): a command body never runs here. New options are walked automatically; an option
without a declared range or path kind fails the walk.
"""

from __future__ import annotations

import inspect
import pickle
import typing
from pathlib import Path

import pytest

from cli_walk import digest as _digest
from cli_walk import invoke as _invoke
from cli_walk import is_flag as _is_flag
from cli_walk import long_flag as _flag
from cli_walk import root_command as _root
from cli_walk import walk_commands
from facetool.cli.limits import (BIN, FILE, FOLDER, MODEL, OUTPUT, REC, STORE, STORE_OR_FOLDER, STORE_OR_MODEL,
                                 STORE_OR_REC, limit_for, path_kind)

NUMBERS = {"nan": "nan", "inf": "inf", "minus one": "-1", "zero": "0", "absurd": "1000000000000"}
SUFFIX = {STORE: ".h5", MODEL: ".pt", BIN: ".bin", FILE: ".csv", STORE_OR_FOLDER: ".h5", STORE_OR_MODEL: ".h5",
          REC: ".rec", STORE_OR_REC: ".h5"}






def _annotation(param):
    td = getattr(param, "type_descriptor", None)
    if td is not None:
        return td.annotation
    fn = inspect.unwrap(param.callback) if getattr(param, "callback", None) else None
    return typing.get_type_hints(fn).get(param.name) if fn else None


def _base_types(tp) -> set:
    args = typing.get_args(tp)
    if not args:
        return {tp}
    return set().union(*(_base_types(a) for a in args if a is not type(None)))








@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """One real, valid-looking input of each kind (they pass the checks that run before any work)."""
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models import create_model, save_checkpoint

    d = tmp_path_factory.mktemp("valid")
    store = d / "store.h5"
    prepare_synthetic(store, identities=4, per_identity=3, size=32, seed=0)
    model = save_checkpoint(d / "model.pt", create_model("resnet18", width=4, num_classes=4, input_size=32))
    folder = d / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a file in a folder\n")
    text = d / "table.csv"
    text.write_text("identity,gender\nsynth_0000,female\n")
    binf = d / "pack.bin"
    binf.write_bytes(pickle.dumps(([], []), protocol=2))
    from facetool.data.recordio import IRHeader, pack, write_rec

    rec = write_rec(d / "pack" / "train.rec", [(0, pack(IRHeader(0, 0.0), b"not an image"))])
    return {STORE: store, MODEL: model, FOLDER: folder, FILE: text, BIN: binf, STORE_OR_FOLDER: store,
            STORE_OR_MODEL: store, REC: rec, STORE_OR_REC: store}


def _plan(command: str, cmd, valid: dict, outs: Path):
    """Base argv of valid placeholders; the numeric options; the input path options with their kinds."""
    base, numbers, paths = [], [], []
    for p in cmd.params:
        if p.name == "help" or getattr(p, "hidden", False):
            continue
        flag = _flag(p)
        types = _base_types(_annotation(p))
        positional = p.param_type_name == "argument"
        if _is_flag(p):
            continue
        if Path in types or (types & {list} and any(Path in _base_types(a) for a in typing.get_args(_annotation(p)))):
            kind = path_kind(command, flag)
            assert kind is not None, f"{command} {flag}: a path option without a declared kind (facetool/cli/limits.py)"
            if kind == OUTPUT:
                value = outs / f"{p.name}.out"
                if p.required:
                    base += [flag, str(value)]
                continue
            paths.append((p, flag, kind, positional))
            if p.required or positional:  # optional inputs join the argv only when they are walked
                base += ([str(valid[kind])] if positional else [flag, str(valid[kind])])
        elif types & {int, float}:
            rng = limit_for(command, flag)
            assert rng is not None, f"{command} {flag}: a numeric option without a declared range (facetool/cli/limits.py)"
            if p.default is not None:
                assert rng.contains(p.default), f"{command} {flag}: default {p.default} outside {rng.describe()}"
            numbers.append((p, flag, rng, int in types and float not in types))
        elif p.required:
            base += (["gender"] if positional else [flag, "gender"])
    return base, numbers, paths




def _replace(argv: list[str], flag: str, positional: bool, old: str, new: str) -> list[str]:
    out = list(argv)
    if positional:
        out[out.index(old)] = new
    elif flag in out:
        out[out.index(flag) + 1] = new
    else:
        out += [flag, new]
    return out


def test_bad_input_matrix(valid, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACETOOL_STORE", raising=False)
    monkeypatch.setenv("COLUMNS", "100000")  # one logical line stays one printed line
    root = _root()
    outs = tmp_path / "outs"
    bad = tmp_path / "bad"
    bad.mkdir()
    before = {k: _digest(v) for k, v in valid.items()}
    failures, cases, walked = [], 0, set()

    def check(command, argv, what, names):
        nonlocal cases
        cases += 1
        rc, output = _invoke(root, capsys, argv)
        text = output.strip()
        problem = None
        if rc != 2:
            problem = f"exit {rc}"
        elif len(text.splitlines()) != 1:
            problem = "not one line"
        elif "Traceback" in text or "internal error" in text:
            problem = "traceback / internal error"
        elif not any(n in text for n in names):
            problem = "does not name the option"
        if outs.exists() or (tmp_path / "runs").exists() or (tmp_path / "eval").exists():
            problem = (problem or "") + " wrote an output"
            import shutil

            for d in (outs, tmp_path / "runs", tmp_path / "eval"):
                shutil.rmtree(d, ignore_errors=True)
        if problem:
            failures.append(f"facetool {command} {what}: {problem}: {text[:300]}")

    for path, cmd in walk_commands(root):
        command = " ".join(path)
        base, numbers, paths = _plan(command, cmd, valid, outs)
        argv0 = command.split()
        for p, flag, rng, is_int in numbers:
            walked.add((command, flag))
            for label, text in NUMBERS.items():
                try:
                    value = int(text) if is_int else float(text)
                except ValueError:
                    value = None  # not an integer: the parser refuses it
                if value is not None and rng.contains(value):
                    continue  # valid by declaration
                check(command, [*argv0, *base, flag, text], f"{flag} {text} ({label})", [flag])
        for p, flag, kind, positional in paths:
            walked.add((command, flag))
            old = str(valid[kind])
            variants = [("a missing file", bad / f"missing{SUFFIX.get(kind, '')}")]
            if kind == FOLDER:
                variants.append(("a file", valid[FILE]))
            else:
                variants.append(("a folder", valid[FOLDER] if kind != STORE_OR_FOLDER else None))
                text = bad / f"text{SUFFIX[kind]}"
                text.write_text("a text file, not what the option reads\n")
                if kind not in (FILE,):
                    variants.append(("a text file with the expected suffix", text))
            others = {k for q, _, k, pos in paths if k != kind and (q.required or pos)}
            for k in sorted(others):
                if not (kind in (STORE_OR_MODEL, STORE_OR_FOLDER, STORE_OR_REC)
                        and k in (STORE, MODEL, FOLDER, STORE_OR_REC)) and \
                        not (kind in (STORE, STORE_OR_REC) and k in (STORE_OR_FOLDER, STORE, STORE_OR_REC)) and \
                        kind != FILE and k != FILE:
                    variants.append((f"the command's {k} input", valid[k]))
            for label, value in variants:
                if value is None:
                    continue
                argv = [*argv0, *_replace(base, flag, positional, old, str(value))]
                name = flag if flag.startswith("--") else flag.upper()
                check(command, argv, f"{name} <{label}>", [name, str(value)])
    assert {k: _digest(v) for k, v in valid.items()} == before, "an input was changed"
    assert cases > 300 and ("train resnet", "--epochs") in walked and ("eval ijbc", "--model") in walked
    assert not failures, f"{len(failures)} of {cases} bad inputs not refused properly:\n" + "\n".join(failures[:60])


@pytest.mark.parametrize("argv,option", [
    (["distill", "kd", "--student", "resnet18", "--mixup", "nan"], "--mixup"),  # W6: NaN into result.json
    (["distill", "kd", "--student", "resnet18", "--unlabeled-weight", "-1"], "--unlabeled-weight"),  # W6
    (["distill", "kd", "--student", "resnet18", "--width", "0"], "--width"),  # W6: silently a width-64 student
    (["train", "resnet", "--input-size", "100000"], "--input-size"),  # I7
    (["train", "aig", "--warmup-epochs", "nan"], "--warmup-epochs"),  # I8
    (["train", "arcface", "--lr", "inf"], "--lr"),
])
def test_reported_bad_numbers_in_a_fresh_process(valid, tmp_path, argv, option):
    """The audit's cases through the real entry point: exit 2, one line naming the option, nothing written."""
    from conftest import run_facetool

    extra = ["--store", valid[STORE], "--out", tmp_path / "run"]
    if argv[0] == "distill":
        extra += ["--teacher", valid[MODEL]]
    r = run_facetool(*argv, *extra, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


class _Marker:
    """Unpickling this would create the file ``path`` (code execution)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickles_are_refused_in_every_model_head_init_resume_and_bin_slot(valid, tmp_path, monkeypatch,
                                                                                  capsys):
    """A pickle that would run code, given to every option that reads a model, a head, a .bin pack or a
    resume state: refused (exit 2, one line), and the code never runs."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100000")
    marker = tmp_path / "PWNED"
    evil_pt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Marker(str(marker))}, evil_pt)
    evil_bin = tmp_path / "evil.bin"
    evil_bin.write_bytes(pickle.dumps(([b"x", b"y"], _Marker(str(marker))), protocol=2))
    root = _root()
    outs = tmp_path / "outs"
    slots, failures = 0, []
    for path, cmd in walk_commands(root):
        command = " ".join(path)
        base, _, paths = _plan(command, cmd, valid, outs)
        for p, flag, kind, positional in paths:
            if kind in (MODEL, BIN, STORE_OR_MODEL) or flag == "--teacher-head":
                evil = evil_bin if kind == BIN else evil_pt
                argv = [*path, *_replace(base, flag, positional, str(valid[kind]), str(evil))]
                rc, out = _invoke(root, capsys, argv)
                slots += 1
                if rc != 2 or len(out.strip().splitlines()) != 1 or marker.exists():
                    failures.append(f"facetool {command} {flag}: exit {rc}: {out.strip()[:200]}")
    # the resume state of a training run
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(evil_pt.read_bytes())
    rc, out = _invoke(root, capsys, ["train", "resnet", "--store", valid[STORE], "--arch", "resnet18", "--width", 4,
                                     "--input-size", 32, "--resume", "--out", run])
    slots += 1
    if rc != 2 or marker.exists():
        failures.append(f"train resnet --resume: exit {rc}: {out.strip()[:200]}")
    assert not marker.exists(), "a pickle ran code"
    assert slots >= 30 and not failures, f"{len(failures)} of {slots} slots:\n" + "\n".join(failures)


# -- RecordIO packs given to a store-only option (REC-2) ------------------------------------------------------
def test_a_pack_given_where_a_face_store_is_read_points_to_prepare_rec(valid, tmp_path, monkeypatch, capsys):
    """Every input option declared a face store (or store-or-folder) only, `train iig --store` among them
    (it reads the store's attributes), refuses a RecordIO pack in one line (exit 2) that names the option and
    says how to convert it (`facetool prepare rec`); nothing is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACETOOL_STORE", raising=False)
    monkeypatch.setenv("COLUMNS", "100000")
    root = _root()
    outs = tmp_path / "outs"
    failures, walked = [], set()
    for path, cmd in walk_commands(root):
        command = " ".join(path)
        base, _, paths = _plan(command, cmd, valid, outs)
        for p, flag, kind, positional in paths:
            if kind not in (STORE, STORE_OR_FOLDER):
                continue
            walked.add((command, flag))
            argv = [*path, *_replace(base, flag, positional, str(valid[kind]), str(valid[REC]))]
            rc, out = _invoke(root, capsys, argv)
            lines = out.strip().splitlines()
            if rc != 2 or len(lines) != 1 or "prepare rec" not in lines[0] or flag not in lines[0] or outs.exists():
                failures.append(f"facetool {command} {flag}: exit {rc}: {out.strip()[:200]}")
    assert ("train iig", "--store") in walked and path_kind("train iig", "--store") == STORE and len(walked) > 10
    assert not failures, "\n".join(failures)
