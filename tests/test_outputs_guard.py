"""Output paths: one guard (facetool.io.guard_output) for every output option of every command.

``test_every_output_option_refuses_inputs_and_foreign_files`` WALKS the Typer app: every command of every
group (also the ones added later), every option whose name looks like an output (--out, --json, --csv,
--grid, --cache, --png, ...). Each is pointed at each input of the same command (with and without
--overwrite) and at an existing file the command did not write; each must be refused with exit 2, a
message naming the option, and every file unchanged. Commands therefore run their output guard before
they read their inputs (the inputs here are placeholder files).
"""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path

import pytest

from cli_walk import digest as _digest
from cli_walk import invoke as _invoke
from cli_walk import is_flag as _is_flag
from cli_walk import long_flag as _long
from cli_walk import root_command as _root
from cli_walk import walk_commands as _commands
from conftest import run_facetool
from facetool.errors import FacetoolError, clip_message
from facetool.io import OUTPUTS_MANIFEST, guard_output, is_own_output, next_free_folder, run_name, write_json

OUTPUT_OPTION = re.compile(r"^--(out|output|json|csv|tsv|grid|cache|png|pdf|svg|html|onnx|npz|npy|h5|save|report|"
                           r"dump|write|export|plot|figure|log)([-_][a-z0-9-_]*)?$")
#: options named like outputs that a command reads (say why)
READ_OPTIONS = {
    ("prepare imdb-face", "--csv"),  # the distributed IMDb-Face.csv
    ("dissect counterfactual", "--output"),  # which model output is measured: class | attribute | embedding (no path)
}


# -- the library guard ------------------------------------------------------------------------------
def test_guard_refuses_an_input_even_with_overwrite(tmp_path):
    src = tmp_path / "s.h5"
    src.write_bytes(b"store")
    for ow in (False, True):
        with pytest.raises(FacetoolError, match="--json .*also an input"):
            guard_output(src, inputs=(src,), overwrite=ow, option="--json")
    link = tmp_path / "link.h5"
    link.symlink_to(src)
    with pytest.raises(FacetoolError, match="also an input"):
        guard_output(link, inputs=(src,), overwrite=True)
    hard = tmp_path / "hard.h5"
    os.link(src, hard)
    with pytest.raises(FacetoolError, match="also an input"):
        guard_output(hard, inputs=(src,), overwrite=True)
    assert src.read_bytes() == b"store"


def test_guard_own_output_may_be_replaced_by_a_rerun_nothing_else(tmp_path):
    out = tmp_path / "res" / "table.json"
    guard_output(out, owner="eval classify")  # a new file: fine, and nothing is written by the guard
    assert not out.parent.exists()
    write_json(out, {"a": 1})
    assert is_own_output(out, "eval classify") and not is_own_output(out, "annotate x")
    guard_output(out, owner="eval classify")  # rerun: its own earlier output
    with pytest.raises(FacetoolError, match="was not written by this command.*--overwrite"):
        guard_output(out, owner="eval ijbc /m.pt")  # another command / another model
    with pytest.raises(FacetoolError, match="exists .*--overwrite"):
        guard_output(out)  # strict outputs (stores, checkpoints) have no owner
    # a file replaced by someone else under the same name is no longer this command's
    out.write_text("someone else's, same size")
    with pytest.raises(FacetoolError, match="was not written by this command"):
        guard_output(out, owner="eval classify")
    guard_output(out, owner="eval classify", overwrite=True)
    # an unclaimed write leaves no record; a foreign file never becomes "own"
    other = tmp_path / "res" / "other.json"
    write_json(other, {})
    assert not is_own_output(other, "eval classify")
    assert (tmp_path / "res" / OUTPUTS_MANIFEST).exists()


def test_guard_folders_files_and_parents(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FacetoolError, match="--out .*is a file, not a folder"):
        guard_output(f, is_dir=True, overwrite=True)
    with pytest.raises(FacetoolError, match="is a folder; give a file name"):
        guard_output(tmp_path, overwrite=True)
    with pytest.raises(FacetoolError, match="inside .*file.txt, which is a file"):
        guard_output(f / "sub" / "model.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    guard_output(empty, is_dir=True)  # an empty folder may be filled
    (empty / "a").write_text("a")
    with pytest.raises(FacetoolError, match="exists .*--resume .*--overwrite"):
        guard_output(empty, is_dir=True, resumable=True)
    guard_output(tmp_path / "new" / "deeper" / "run", is_dir=True)  # missing parents are created by writers
    assert not (tmp_path / "new").exists()
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(FacetoolError, match="not writable"):
                guard_output(ro / "x.json", option="--json")
        finally:
            ro.chmod(0o700)


def test_next_free_folder_and_run_name(tmp_path, monkeypatch):
    assert next_free_folder(tmp_path / "runs", "aig-resnet50") == tmp_path / "runs" / "aig-resnet50-1"
    (tmp_path / "runs" / "aig-resnet50-1").mkdir(parents=True)
    (tmp_path / "runs" / "aig-resnet50-2").write_text("")
    assert next_free_folder(tmp_path / "runs", "aig-resnet50").name == "aig-resnet50-3"
    assert run_name("runs/aig04/model.pt") == "aig04_model"
    assert run_name(Path("/x/r50/backbone.pth")) == "r50_backbone"
    monkeypatch.chdir(tmp_path)
    assert run_name("model.pt") == f"{tmp_path.name}_model"


def test_clip_message_keeps_whole_words():
    long = "first sentence is here. " + "word " * 100
    out = clip_message(long, 60)
    assert out.endswith(" ...") and "\n" not in out and out.startswith("first sentence is here.")
    assert clip_message("a\n  b") == "a b"


# -- walking the CLI ---------------------------------------------------------------------------------






def _hints(cmd) -> dict:
    fn = inspect.unwrap(cmd.callback)
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: treat as no paths
        return {}


def _is_path(tp) -> bool:
    return tp is Path or any(_is_path(a) for a in typing.get_args(tp))








def _plan(tmp: Path, cmd, name: str):
    """Base argv (every input path given a placeholder) and the command's output options."""
    hints = _hints(cmd)
    base, inputs, outputs = [], {}, []
    for p in cmd.params:
        if p.name in ("help",) or getattr(p, "hidden", False):
            continue
        opt = _long(p) if p.param_type_name == "option" else None
        if opt and OUTPUT_OPTION.match(opt) and not _is_flag(p) and (name, opt) not in READ_OPTIONS:
            outputs.append((p, opt))
            continue
        if _is_flag(p):
            continue
        if _is_path(hints.get(p.name)):
            # a placeholder of the declared kind (inputs are checked, by kind, before anything else)
            from facetool.cli.limits import path_kind

            kind = path_kind(name, opt or p.name)
            folder = kind == "folder"
            path = tmp / "inputs" / (p.name + ("" if folder else ".in"))
            if folder:
                path.mkdir(parents=True, exist_ok=True)
                (path / "x.txt").write_text(f"input {p.name}\n")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                head = {"store": b"\x89HDF\r\n\x1a\n", "store-or-folder": b"\x89HDF\r\n\x1a\n",
                        "store-or-model": b"\x89HDF\r\n\x1a\n", "model": b"PK\x03\x04", "bin": b"\x80\x02",
                        "store-or-rec": b"\x89HDF\r\n\x1a\n", "rec": b"\x0a\x23\xd7\xce"}
                path.write_bytes(head.get(kind, b"") + f"placeholder input for {p.name}\n".encode() * 8)
                if kind == "rec":  # a pack is its .rec and the .idx beside it
                    path.with_suffix(".idx").write_text("0\t0\n")
            inputs[opt or p.name] = path
            base += [opt, str(path)] if opt else [str(path)]
        elif p.required:
            tp = hints.get(p.name)
            value = "1" if tp in (int, float) else "gender"
            base += [opt, value] if opt else [value]
    return base, inputs, outputs


def test_every_output_option_refuses_inputs_and_foreign_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACETOOL_STORE", raising=False)
    monkeypatch.setenv("COLUMNS", "100000")  # one logical line stays one printed line
    walked = set()
    root = _root()
    for path, cmd in _commands(root):
        base, inputs, outputs = _plan(tmp_path / "_".join(path), cmd, " ".join(path))
        has_overwrite = any("--overwrite" in p.opts for p in cmd.params)
        for param, opt in outputs:
            walked.add((" ".join(path), opt))
            before = {k: _digest(v) for k, v in inputs.items()}
            # an input is refused even with --overwrite (which implies: without it too)
            cases = [(inp, ["--overwrite"] if has_overwrite else []) for inp in inputs.values()]
            foreign = tmp_path / "foreign" / f"{'_'.join(path)}{opt}.dat"
            foreign.parent.mkdir(exist_ok=True)
            foreign.write_bytes(b"not written by facetool\n")
            cases.append((foreign, []))
            for target, extra in cases:
                argv = [*path, *base, opt, str(target), *extra]
                rc, output = _invoke(root, capsys, argv)
                what = f"facetool {' '.join(argv)} -> {rc}: {output.strip()}"
                assert rc == 2, what
                assert opt in output or str(target) in output, what
                assert "Traceback" not in output and len(output.strip().splitlines()) == 1, what
            assert {k: _digest(v) for k, v in inputs.items()} == before, f"{path} {opt} changed an input"
            assert foreign.read_bytes() == b"not written by facetool\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "eval").exists()  # nothing written
    # the walk really reached the known outputs (and reaches new commands the same way)
    for known in [("eval classify", "--json"), ("annotate", "--json"), ("eval ijbc", "--cache"),
                  ("eval ijbc", "--out"), ("eval lfw", "--out"), ("train aig", "--out"), ("train arcface", "--out"),
                  ("prepare synthetic", "--grid"), ("prepare imdb-face", "--out"), ("dissect gates", "--out"),
                  ("invert", "--out"), ("export", "--out")]:
        assert known in walked, known


# -- the reported cases, on real files ---------------------------------------------------------------
def test_eval_classify_and_annotate_never_write_over_the_store(synthetic_store, tmp_path, cli):
    store = tmp_path / "s.h5"
    store.write_bytes(synthetic_store.read_bytes())
    digest = _digest(store)
    from facetool.models import create_model, save_checkpoint

    save_checkpoint(tmp_path / "m.pt", create_model("resnet18", num_classes=8, width=4, input_size=32))
    (tmp_path / "a.csv").write_text("identity,gender\nsynth_0000,female\n")
    r = cli("eval", "classify", "--store", store, "--model", tmp_path / "m.pt", "--json", store)
    assert r.exit_code == 2 and "also an input" in r.output
    r = cli("annotate", "--store", store, tmp_path / "a.csv", "--json", store, "--overwrite")
    assert r.exit_code == 2 and "also an input" in r.output
    r = cli("eval", "ijbc", "--root", tmp_path, "--model", tmp_path / "m.pt", "--cache", store)
    assert r.exit_code == 2 and "not a facetool feature cache" in r.output
    assert _digest(store) == digest


def test_a_rerun_replaces_its_own_result_and_nothing_else(tmp_path, cli):
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models import create_model, save_checkpoint

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=4, size=32)
    model = save_checkpoint(tmp_path / "run1" / "model.pt",
                            create_model("resnet18", num_classes=4, width=4, input_size=32))
    table = tmp_path / "t.json"
    argv = ["eval", "classify", "--store", store, "--model", model, "--json", table]
    assert cli(*argv).exit_code == 0
    first = table.stat().st_mtime_ns
    r = cli(*argv)  # the same command again: its own earlier result is refreshed
    assert r.exit_code == 0, r.output
    assert table.stat().st_mtime_ns != first
    table.write_text('{"mine": true}')  # edited by someone else: no longer this command's output
    r = cli(*argv)
    assert r.exit_code == 2 and "was not written by this command" in r.output
    assert table.read_text() == '{"mine": true}'
    assert cli(*argv, "--overwrite").exit_code == 0
    (tmp_path / "a.csv").write_text("identity,gender\nsynth_0000,female\n")
    r = cli("annotate", "--store", store, tmp_path / "a.csv", "--json", table)  # another command
    assert r.exit_code == 2 and "was not written by this command" in r.output


def test_error_text_is_literal_and_whole(cli, tmp_path):
    r = cli("info", "data[v2]/s.h5")
    assert r.exit_code == 2 and "data[v2]/s.h5" in r.output
    long_name = "a" * 150 + "[b]/" + "c" * 150
    r = cli("info", f"{long_name}/s.h5")
    assert r.exit_code == 2 and f"{long_name}/s.h5" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli("info", "x" * 300 + ".h5")  # the system refuses the name: still a one-line user error
    assert r.exit_code == 2 and "File name too long" in r.output and len(r.output.strip().splitlines()) == 1


BAD_NUMBERS = [
    (["train", "resnet", "--width", "0", "--arch", "resnet18"], "--width"),
    (["train", "resnet", "--input-size", "0"], "--input-size"),
    (["train", "aig", "--input-size", "8", "--arch", "resnet18"], "--input-size must be in [16, 1024]"),
    (["train", "aig", "--input-size", "20", "--arch", "resnet18"], "--input-size must be >= 32"),
    (["train", "resnet", "--workers", "-1"], "--workers"),
    (["train", "resnet", "--max-steps", "-1"], "--max-steps"),
    (["train", "resnet", "--momentum", "1.5"], "--momentum"),
    (["train", "aig", "--target-weight", "-1", "--arch", "resnet18", "--width", "8"], "--target-weight"),
    (["train", "aig", "--gate-hidden", "0", "--arch", "resnet18", "--width", "8"], "--gate-hidden"),
    (["train", "arcface", "--embedding-size", "0", "--network", "r18", "--width", "8"], "--embedding-size"),
    (["train", "arcface", "--scale", "0"], "--scale"),
    (["train", "arcface", "--input-size", "40", "--network", "r18", "--width", "8"], "multiple of 16"),
    (["prepare", "synthetic", "--size", "8"], "--size"),
]


@pytest.mark.parametrize("argv,expect", BAD_NUMBERS, ids=[" ".join(a[:2] + a[2:3]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_user_errors_and_write_nothing(argv, expect, synthetic_store, tmp_path,
                                                                monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", tmp_path / "o" / "x.h5"] if argv[0] == "prepare" else \
        ["--store", synthetic_store, "--out", tmp_path / "o", "--epochs", "1"]
    r = cli(*argv, *extra)
    assert r.exit_code == 2, r.output
    assert expect in r.output and "internal error" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()


def test_prepare_bad_numbers(tmp_path, cli):
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "IMDb-Face.csv").write_text("name,index,image,rect,height width,url\n")
    for argv, expect in [
        (["imdb-face", "--root", tmp_path / "root", "--csv", tmp_path / "IMDb-Face.csv", "--workers", "-3"], "--workers"),
        (["imdb-face", "--root", tmp_path / "root", "--csv", tmp_path / "IMDb-Face.csv", "--size", "0"], "--size"),
        (["folder", tmp_path / "root", "--det-size", "-1"], "--det-size"),
        (["folder", tmp_path / "root", "--workers", "0"], "--workers"),
        (["synthetic", "--grid", tmp_path / "IMDb-Face.csv" / "g.png"], "--grid"),
        (["synthetic", "--grid", tmp_path / "g.jpg"], "--grid"),
    ]:
        r = cli("prepare", *argv, "--out", tmp_path / "o" / "x.h5")
        assert r.exit_code == 2 and expect in r.output, (argv, r.output)
        assert not (tmp_path / "o").exists()


def test_folder_outputs_are_not_written_into_without_overwrite(tmp_path, cli, synthetic_store):
    from facetool.models import create_model, save_checkpoint

    save_checkpoint(tmp_path / "m.pt", create_model("aig_resnet18", num_classes=8, width=4, input_size=32))
    (tmp_path / "s.h5").write_bytes(synthetic_store.read_bytes())
    out = tmp_path / "dissect"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("dissect", "gates", "--model", tmp_path / "m.pt", "--store", tmp_path / "s.h5", "--out", out)
    assert r.exit_code == 2 and "--out" in r.output and "--overwrite" in r.output
    r = cli("train", "aig", "--store", tmp_path / "s.h5", "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output and "--overwrite" in r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_annotate_as_refuses_an_existing_attribute_without_overwrite(synthetic_store, tmp_path, cli):
    from facetool.annotate import estimate_from_model

    store = tmp_path / "s.h5"
    store.write_bytes(synthetic_store.read_bytes())
    model = tmp_path / "m.pt"
    model.write_bytes(b"\x80placeholder")  # refused before the model is read
    with pytest.raises(FacetoolError, match="--as skin: the store already has an attribute 'skin'.*--overwrite"):
        estimate_from_model(store, model, "gender", as_name="skin")


def test_recipe_passes_ctrl_c_through_and_suggests_resume(tmp_path, cli, monkeypatch):
    import facetool.data.synthetic as synth

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "prepare_synthetic", interrupted)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[step]]\nname = "faces"\nrun = "prepare synthetic --out {tmp_path}/s.h5 --overwrite"\n')
    r = cli("recipe", recipe)
    assert r.exit_code == 130, r.output
    assert f"--from-step 1 --resume" in r.output
    r = cli("recipe", recipe, "--from-step", "1", "--resume", "--dry-run")
    assert r.exit_code == 0 and "--resume" in r.output and "--overwrite" not in r.output.replace("\n", " ")
    r = cli("recipe", recipe, "--from-step", "3")
    assert r.exit_code == 2 and "--from-step must be in 1..1" in r.output
    # W3: the advice repeats the --set values (quoted), so following it continues the same run
    recipe.write_text('[vars]\nout = "default"\n[[step]]\nname = "faces"\nrun = "prepare synthetic --out {out}/s.h5 --overwrite"\n')
    r = cli("recipe", recipe, "--set", f"out={tmp_path}/my runs")
    assert r.exit_code == 130, r.output
    assert f"--set 'out={tmp_path}/my runs' --from-step 1 --resume" in " ".join(r.output.split())


@pytest.mark.slow
def test_card_command_writes_a_new_default_run_folder(synthetic_store, tmp_path):
    """`facetool train aig --target 0.4` with FACETOOL_STORE set works as written (speed options added),
    in a fresh interpreter; a second run gets the next free folder, never the first run's."""
    fast = ["--arch", "resnet18", "--width", "8", "--input-size", "32", "--epochs", "1", "--batch-size", "16",
            "--max-steps", "1", "--no-flip"]
    env = {"FACETOOL_STORE": str(synthetic_store)}
    r = run_facetool("train", "aig", "--target", "0.4", *fast, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    first = tmp_path / "runs" / "aig-resnet18-1"
    assert (first / "model.pt").is_file()
    stamp = (first / "model.pt").stat().st_mtime_ns
    r = run_facetool("train", "aig", "--target", "0.4", *fast, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "aig-resnet18-2" / "model.pt").is_file()
    assert (first / "model.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_usage_errors_are_one_line_in_a_fresh_process(tmp_path):
    r = run_facetool("train", "aig", "--epochs", "x", "--store", tmp_path / "s.h5", cwd=tmp_path)
    assert r.returncode == 2 and "--epochs" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


# -- #17 data loss: an output is never an input, a file of an input folder, or a run folder holding an input
def test_d1_d2_an_output_never_replaces_a_file_of_the_input_dataset(tmp_path, cli):
    """D1/D2: `prepare celeba --out CelebA/Anno/list_attr_celeba.txt --overwrite` and `prepare folder
    FairFace --out FairFace/train/1.jpg --overwrite` turned an input file into a store."""
    from test_celeba_fairface import write_celeba

    root = write_celeba(tmp_path / "CelebA")
    victims = [p for p in root.rglob("*") if p.is_file()]
    before = {p: _digest(p) for p in victims}
    attr = next(p for p in victims if p.name == "list_attr_celeba.txt")
    img = next(p for p in victims if p.suffix == ".jpg")
    for out in (attr, img):
        r = cli("prepare", "celeba", "--root", root, "--out", out, "--overwrite")
        assert r.exit_code == 2, r.output
    r = cli("prepare", "folder", root / "img_align_celeba", "--aligned", "--size", 32, "--out", img, "--overwrite")
    assert r.exit_code == 2 and ("input folder" in r.output or "must end in .h5" in r.output), r.output
    h5 = root / "inside.h5"
    h5.write_bytes(b"an input file that happens to be .h5")
    r = cli("prepare", "folder", root, "--aligned", "--size", 32, "--out", h5, "--overwrite")
    assert r.exit_code == 2 and "file of the input folder" in r.output, r.output
    assert {p: _digest(p) for p in victims} == before


def test_d3_init_checkpoint_inside_the_run_folder_is_refused(synthetic_store, tmp_path, cli):
    from facetool.models import create_model, save_checkpoint

    run = tmp_path / "r18"
    init = save_checkpoint(run / "model.pt", create_model("resnet18", width=8, num_classes=8, input_size=32))
    digest = _digest(init)
    r = cli("train", "resnet", "--store", synthetic_store, "--arch", "resnet18", "--width", 8, "--input-size", 32,
            "--epochs", 1, "--max-steps", 1, "--init", init, "--out", run, "--overwrite")
    assert r.exit_code == 2 and "holds the input" in r.output and str(init) in r.output, r.output
    assert _digest(init) == digest


def test_d4_outputs_carry_their_suffix(synthetic_store, tmp_path, cli):
    """D4: `eval classify --json other/model.pt --overwrite` and `prepare synthetic --out model.pt
    --overwrite` replaced another model's checkpoint."""
    from facetool.models import create_model, save_checkpoint

    victim = save_checkpoint(tmp_path / "gender" / "model.pt", create_model("resnet18", width=8, num_classes=8,
                                                                             input_size=32))
    model = save_checkpoint(tmp_path / "r18" / "model.pt", create_model("resnet18", width=8, num_classes=8,
                                                                        input_size=32))
    digest = _digest(victim)
    r = cli("eval", "classify", "--store", synthetic_store, "--model", model, "--json", victim, "--overwrite")
    assert r.exit_code == 2 and "--json" in r.output and "must end in .json" in r.output, r.output
    r = cli("prepare", "synthetic", "--identities", 2, "--per-identity", 2, "--size", 32, "--out", victim, "--overwrite")
    assert r.exit_code == 2 and "must end in .h5 or .hdf5" in r.output, r.output
    r = cli("prepare", "synthetic", "--identities", 2, "--per-identity", 2, "--size", 32, "--out", tmp_path / "s.h5",
            "--grid", victim, "--overwrite")
    assert r.exit_code == 2 and "--grid" in r.output and ".png" in r.output, r.output
    assert _digest(victim) == digest and not (tmp_path / "s.h5").exists()
