"""Core plumbing: safe loading, checkpoints, recipes, CLI error handling."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from facetool.errors import FacetoolError
from facetool.io import atomic_path, restricted_loads, torch_load, torch_save
from facetool.models import FaceModel, create_model, load_model, register_model, save_checkpoint
from facetool.recipe import load_recipe


class _Tiny(FaceModel):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward_features(self, x, internals=None):
        return self.conv(x)

    def forward_head(self, f):
        return self.fc(f.mean((2, 3)))


@register_model("_test_tiny")
def _tiny(classes: int = 3):
    return _Tiny(classes)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/facetool_pwned",))

    data = pickle.dumps(([b"img"], Evil()))
    with pytest.raises(FacetoolError, match="asks to run posix.system when unpickled, which facetool refuses"):
        restricted_loads(data)
    ok = pickle.dumps(([b"a", b"b"], [True]), protocol=2)
    with pytest.raises(FacetoolError, match="is corrupt or truncated"):  # damage is not a refusal
        restricted_loads(ok[: len(ok) // 2])
    assert not os.path.exists("/tmp/facetool_pwned")
    assert restricted_loads(pickle.dumps(([b"a", b"b"], [True]), protocol=2)) == ([b"a", b"b"], [True])


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    m = create_model("_test_tiny", classes=3)
    assert m.config == {"name": "_test_tiny", "classes": 3}
    p = save_checkpoint(tmp_path / "m.pt", m, meta={"epochs": 2})
    raw = torch.load(p, weights_only=True)  # anyone can read it safely
    assert raw["config"]["name"] == "_test_tiny" and set(raw["state_dict"]) == set(m.state_dict())
    m2 = load_model(p)
    assert m2.meta == {"epochs": 2} and not m2.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x), m2(x))
    # a checkpoint of another shape names the offending keys
    other = save_checkpoint(tmp_path / "o.pt", create_model("_test_tiny", classes=5))
    with pytest.raises(FacetoolError, match=r"shape mismatch: fc\.weight"):
        load_model(other, name="_test_tiny", classes=3)
    sd = dict(m.state_dict())
    sd.pop("fc.bias")
    sd["extra.w"] = torch.zeros(1)
    torch_save(sd, tmp_path / "sd.pth")
    with pytest.raises(FacetoolError, match=r"missing keys: fc\.bias; unexpected keys: extra\.w"):
        load_model(tmp_path / "sd.pth", name="_test_tiny")


def test_torch_load_refuses_pickled_code_and_corrupt(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(FacetoolError, match="not a plain weights file"):
        torch_load(p)
    c = tmp_path / "corrupt.pt"
    c.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FacetoolError, match="corrupt"):
        torch_load(c)


def test_truncated_checkpoints_are_called_damaged_in_one_short_line(tmp_path):
    """Damage (a truncated pickle inside the zip, a truncated legacy file) is reported as corrupt or
    truncated, in one line without PyTorch's weights_only advice; real code in a pickle stays refused."""
    import zipfile

    ok = tmp_path / "ok.pt"
    torch.save({"a": torch.zeros(100)}, ok)
    bad = tmp_path / "cut.pt"
    with zipfile.ZipFile(ok) as zin, zipfile.ZipFile(bad, "w") as zout:
        for it in zin.infolist():
            b = zin.read(it.filename)
            zout.writestr(it, b[: len(b) // 2] if it.filename.endswith("data.pkl") else b)
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:60])
    for p in (bad, legacy):
        with pytest.raises(FacetoolError) as e:
            torch_load(p)
        msg = str(e.value)
        assert "corrupt" in msg and str(p) in msg and "\n" not in msg and len(msg) < 400, msg
        assert "weights_only" not in msg and "trusted source" not in msg, msg


def test_bin_pack_errors_name_the_file(tmp_path):
    from facetool.eval.verification import load_bin

    p = tmp_path / "lfw.bin"
    data = pickle.dumps(([b"a", b"b"], [True]), protocol=2)
    p.write_bytes(data[:10])
    with pytest.raises(FacetoolError, match=f"verification pack {p} is corrupt or truncated"):
        load_bin(p)


def test_recipe_variables_and_errors(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('[vars]\nout = "runs/x"\n[[step]]\nname = "one"\nrun = "info {out}/a.h5 --json"\n')
    title, steps = load_recipe(r, {"out": "elsewhere"})
    assert steps[0].argv == ["info", "elsewhere/a.h5", "--json"]
    r.write_text('[[step]]\nrun = "info {missing}"\n')
    with pytest.raises(FacetoolError, match="undefined variable"):
        load_recipe(r)


def test_cli_errors_are_one_line(cli, tmp_path):
    res = cli("info", tmp_path / "missing.h5")
    assert res.exit_code == 2
    assert "not found" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    res = cli("info", bad)
    assert res.exit_code == 2 and "corrupt" in res.output
    r = tmp_path / "r.toml"
    r.write_text(f'[[step]]\nname = "broken"\nrun = "info {bad}"\n')
    res = cli("recipe", r)
    assert res.exit_code == 2 and "stopped at step 1" in res.output


def test_ddp_prefixed_state_dict_loads(tmp_path):
    m = create_model("_test_tiny", classes=3)
    torch_save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "ddp.pth")
    m2 = load_model(tmp_path / "ddp.pth", name="_test_tiny")
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(m(x), m2(x))


def test_recipe_set_values_are_one_argument_and_variables_follow_them(tmp_path):
    """W4: a --set value with spaces stays one argument; `store = "{out}/s.h5"` follows --set out=...;
    a variable holding several arguments is split as the recipe's own; unknown names and circles are refused."""
    r = tmp_path / "r.toml"
    r.write_text('[vars]\nout = "runs/x"\nstore = "{out}/s.h5"\nopts = "--json --limit 3"\n'
                 '[[step]]\nrun = "info {store} {opts}"\n')
    _, steps = load_recipe(r, {"out": "my runs/it's here"})
    assert steps[0].argv == ["info", "my runs/it's here/s.h5", "--json", "--limit", "3"]
    _, steps = load_recipe(r, {"opts": "--json --limit 5"})
    assert steps[0].argv == ["info", "runs/x/s.h5", "--json", "--limit", "5"]
    _, steps = load_recipe(r, {"out": "{braces}"})
    assert steps[0].argv[1] == "{braces}/s.h5"
    with pytest.raises(FacetoolError, match="no variable 'ot'.*opts, out, store"):
        load_recipe(r, {"ot": "x"})
    r.write_text('[vars]\na = "{b}"\nb = "{a}"\n[[step]]\nrun = "info {a}"\n')
    with pytest.raises(FacetoolError, match="circle"):
        load_recipe(r)


def test_shipped_recipes_put_every_output_under_out(tmp_path):
    """W4: --set out=DIR moves every path the synthetic recipes write (their stores too)."""
    from pathlib import Path

    for name in ("quickstart", "abn_synthetic", "distill_synthetic", "relevance_generalisation", "condface_synthetic"):
        _, steps = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.toml", {"out": str(tmp_path / "o")})
        for s in steps:
            for flag in ("--out", "--store", "--json"):
                if flag in s.argv:
                    assert s.argv[s.argv.index(flag) + 1].startswith(str(tmp_path / "o")), (name, s.argv)


def test_ctrl_c_swallowed_in_a_weakref_callback_still_ends_the_command_with_130(capfd):
    """C1: a KeyboardInterrupt raised inside a weakref callback is only printed by Python ("Exception
    ignored"); the command must still end as interrupted (exit 130), not with exit 0."""
    import signal
    import weakref

    import typer

    from facetool.cli.common import guarded

    class Thing:
        pass

    @guarded
    def command():
        t = Thing()
        weakref.finalize(t, signal.raise_signal, signal.SIGINT)
        del t  # the callback runs here; its KeyboardInterrupt is swallowed
        return "finished"

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 130
    assert "interrupted" in capfd.readouterr().err


def test_recipe_summary_headlines_and_pictures(tmp_path):
    """Issue 21: steps name a headline number (a dotted key into a JSON they write) and pictures; the recipe
    ends with one summary table of every step's seconds, headline and pictures, and writes it to the
    recipe's summary JSON. A missing file or key reads '-', a missing picture is marked."""
    import json

    from conftest import run_facetool
    from facetool.recipe import Headline, load_recipe_summary, read_headline

    data = tmp_path / "r.json"
    data.write_text(json.dumps({"models": [{"top1": 0.123456}, {"top1": 0.5}], "name": "x"}))
    assert read_headline(Headline("a", str(data), "models.1.top1")) == "0.5"
    assert read_headline(Headline("a", str(data), "models.0.top1")) == "0.1235"
    assert read_headline(Headline("a", str(data), "models.2.top1")) == "-"
    assert read_headline(Headline("a", str(data), "models")) == "-"
    assert read_headline(Headline("a", str(tmp_path / "none.json"), "x")) == "-"
    r = tmp_path / "r.toml"
    r.write_text('summary = "{out}/summary.json"\n[vars]\nout = "o"\n[[step]]\nrun = "info {out}/s.h5"\n'
                 'headline = [{ label = "images", file = "{out}/s.json", key = "images" }]\npictures = ["{out}/g.png"]\n')
    _, steps, summary = load_recipe_summary(r, {"out": str(tmp_path / "o")})
    assert summary == str(tmp_path / "o" / "summary.json")
    assert steps[0].headlines == [Headline("images", str(tmp_path / "o" / "s.json"), "images")]
    assert steps[0].pictures == [str(tmp_path / "o" / "g.png")]
    r.write_text('[[step]]\nrun = "info x"\nheadline = ["images"]\n')
    with pytest.raises(FacetoolError, match="headline must be a list of"):
        load_recipe_summary(r)
    # the command: a real step, its headline read from the report it wrote, a picture it did not write
    out = tmp_path / "run"
    r.write_text(f'summary = "{{out}}/summary.json"\n[vars]\nout = "{out}"\n[[step]]\nname = "prepare"\n'
                 'run = "prepare synthetic --identities 3 --per-identity 2 --size 32 --out {out}/s.h5"\n'
                 'headline = [{ label = "images", file = "{out}/s.json", key = "images" }]\n'
                 'pictures = ["{out}/s.h5", "{out}/nothing.png"]\n')
    res = run_facetool("recipe", r)
    assert res.returncode == 0, res.stderr
    assert "summary:" in res.stdout and "images 6" in res.stdout and "nothing.png (missing)" in res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"][0]["headline"] == "images 6" and s["steps"][0]["seconds"] > 0
