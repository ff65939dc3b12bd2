"""`facetool annotate`: CSV import (majority vote, ties, unknown, vocabulary, columns) and Eq. 5 estimates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facetool.annotate import annotate_store, canonical_value, majority_vote
from facetool.errors import FacetoolError
from facetool.store import FaceStore, Record, StoreWriter


def tiny_store(path: Path, ids: int = 3, per_id: int = 2, size: int = 16) -> Path:
    """ids x per_id images; image i of identity k has source 'id{k}/{i}.jpg'; every 2nd image test."""
    w = StoreWriter(path, image_size=(size, size), identities=[f"id{k}" for k in range(ids)])
    rng = np.random.default_rng(0)
    for k in range(ids):
        for i in range(per_id):
            w.append(Record(image=rng.integers(0, 255, (size, size, 3), dtype=np.uint8), label=k,
                            split=i % 2, source=f"id{k}/{i}.jpg"))
    w.finalize()
    return path


def write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_majority_vote_rules():
    assert majority_vote(["male", "male", "female"]) == "male"
    assert majority_vote(["male", "female"]) == "unknown"  # tie
    assert majority_vote(["unknown", "unknown", "female"]) == "female"  # unknown abstains
    assert majority_vote([]) == "unknown"
    assert canonical_value("age", "35") == "20-40"
    assert canonical_value("race", "East Asian") == "east_asian"
    assert canonical_value("gender", " ? ") == "unknown"


def test_long_csv_votes_ties_and_annotators(tmp_path):
    s = tiny_store(tmp_path / "s.h5")
    csv = write(tmp_path / "a.csv",
                "identity,feature,value,annotator\n"
                "id0,gender,male,a\nid0,gender,male,b\nid0,gender,female,c\n"  # 2:1 -> male
                "id1,gender,male,a\nid1,gender,female,b\n"                      # tie -> unknown
                "id2,gender,female,a\nid2,gender,male,a\nid2,gender,male,b\n"   # a changed mind -> male
                "id9,gender,male,a\n")                                          # not in store
    res = annotate_store(s, [csv])
    assert res["features"]["gender"]["ties"] == 1
    assert res["skipped_keys"] == {"identity": 1}
    with FaceStore(s) as st:
        codes, vals = st.attribute("gender", per_image=False)
        assert vals == ["female", "male"]
        assert codes.tolist() == [1, -1, 1]
        per_img, _ = st.attribute("gender")
        assert per_img.tolist() == [1, 1, -1, -1, 1, 1]
        assert "annotate" in json.loads(st.f["identity_attributes/gender"].attrs["provenance"])["tool"]


def test_wide_per_image_csv_by_source_and_index_merge(tmp_path):
    s = tiny_store(tmp_path / "s.h5")
    by_src = write(tmp_path / "src.csv", "\ufeffsource,age,Skin colour\nid0/0.jpg,35,Dark\nid1/1.jpg,60+,unknown\n")
    by_idx = write(tmp_path / "idx.csv", "index,age\n5,12\n")
    annotate_store(s, [by_src, by_idx])
    with FaceStore(s) as st:
        age, vals = st.attribute("age")
        assert vals == ["0-20", "20-40", "40-60", "60+"]
        assert age.tolist() == [1, -1, -1, 3, -1, 0]
        skin, svals = st.attribute("skin")
        assert skin.tolist() == [svals.index("dark"), -1, -1, -1, -1, -1]
        assert st.attribute_names("identity") == []
    # a second import merges: untouched rows keep their value
    annotate_store(s, [write(tmp_path / "more.csv", "index,age\n1,45\n")])
    with FaceStore(s) as st:
        assert st.attribute("age")[0].tolist() == [1, 2, -1, 3, -1, 0]


def test_unknown_values_are_refused_unless_extend_vocab(tmp_path, cli):
    s = tiny_store(tmp_path / "s.h5")
    csv = write(tmp_path / "bad.csv", "identity,gender,hair\nid0,mail,red\nid1,female,\n")
    before = (tmp_path / "s.h5").read_bytes()
    with pytest.raises(FacetoolError, match=r"'mail'") as e:
        annotate_store(s, [csv])
    assert "hair" in str(e.value) and "--extend-vocab" in str(e.value)
    assert (tmp_path / "s.h5").read_bytes() == before  # nothing written
    r = cli("annotate", "--store", s, csv)
    assert r.exit_code != 0 and "mail" in r.output and "Traceback" not in r.output
    res = annotate_store(s, [csv], extend_vocab=True)
    assert res["features"]["gender"]["values"] == ["female", "male", "mail"]
    with FaceStore(s) as st:
        assert st.attribute("hair", per_image=False)[1] == ["red"]


@pytest.mark.parametrize("text, match", [
    ("name,gender\nid0,male\n", "key column"),
    ("identity,source,gender\nid0,x,male\n", "key column"),
    ("identity,feature,value,extra\nid0,gender,male,1\n", "long-format"),
    ("identity,feature\nid0,gender\n", "long-format"),
    ("identity\nid0\n", "no feature columns"),
    ("index,gender\n99,male\n", "outside the store"),
    ("index,gender\nfoo,male\n", "not an integer"),
    ("identity,gender\nnobody,male\n", "none of the annotated keys"),
])
def test_wrong_columns_and_keys_give_one_line_errors(tmp_path, cli, text, match):
    s = tiny_store(tmp_path / "s.h5")
    csv = write(tmp_path / "x.csv", text)
    with pytest.raises(FacetoolError, match=match):
        annotate_store(s, [csv])
    r = cli("annotate", "--store", s, csv)
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1


def test_cli_annotate_writes_json_and_missing_files(tmp_path, cli):
    s = tiny_store(tmp_path / "s.h5")
    csv = write(tmp_path / "g.csv", "identity,gender\nid0,M\nid0,male\nid1,F\n")
    r = cli("annotate", "--store", s, write(tmp_path / "g2.csv", "identity,gender\nid0,male\nid1,female\n"),
            "--json", tmp_path / "out.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out.json").read_text())["features"]["gender"]["counts"] == {
        "female": 1, "male": 1, "unknown": 1}
    r = cli("annotate", "--store", s, csv)  # 'm'/'f' are not vocabulary words
    assert r.exit_code != 0 and "'m'" in r.output
    r = cli("annotate", "--store", tmp_path / "missing.h5", csv)
    assert r.exit_code != 0 and "not found" in r.output
    r = cli("annotate", "--store", s, tmp_path / "missing.csv")
    assert r.exit_code != 0 and "not found" in r.output
    r = cli("annotate", "--store", s, "--from-model", tmp_path / "missing.pt", "--feature", "gender")
    assert r.exit_code != 0 and "not found" in r.output
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary copies left behind


def _iig_checkpoint(path: Path, open_blocks: list[int], vocab: list[str]) -> Path:
    """aig_resnet18 (8 gated blocks) whose gates are fixed by their biases: exactly ``open_blocks`` run."""
    import torch

    from facetool.trainers.aig import gated_blocks
    from facetool.models import create_model, save_checkpoint

    torch.manual_seed(0)
    m = create_model("aig_resnet18", num_classes=3, input_size=32, width=8)
    with torch.no_grad():
        for j, b in enumerate(gated_blocks(m)):
            b.gate.fc2.weight.zero_()
            b.gate.fc2.bias.copy_(torch.tensor([-5.0, 5.0] if j in open_blocks else [5.0, -5.0]))
    meta = {"method": "iig", "masks": {"gender": {"female": [2, 4], "male": [3, 5]}}, "vocab": {"gender": vocab}}
    return save_checkpoint(path, m, meta)


def test_from_model_estimates_by_eq5_with_provenance_and_accuracy(tmp_path, cli):
    import hashlib

    s = tiny_store(tmp_path / "s.h5")
    annotate_store(s, [write(tmp_path / "g.csv", "identity,gender\nid0,male\nid1,female\nid2,male\n")])
    # open {2, 3, 5}, closed {4}: distance to female [2,4] = 0+1+1+1 = 3, to male [3,5] = 1+0+0+0 = 1 -> male
    ck = _iig_checkpoint(tmp_path / "iig.pt", [0, 1, 2, 3, 5, 6, 7], vocab=["male", "female"])
    r = cli("annotate", "--store", s, "--from-model", ck, "--feature", "gender", "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["counts"] == {"male": 6, "female": 0}
    assert res["accuracy"] == pytest.approx(4 / 6)  # id1's two images are female
    with FaceStore(s) as st:
        est, vals = st.attribute("gender_estimated")
        assert vals == ["male", "female"] and est.tolist() == [0] * 6
        prov = json.loads(st.f["attributes/gender_estimated"].attrs["provenance"])
        assert prov["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
        assert prov["model"] == str(ck.resolve())
        assert st.attribute("gender")[0].tolist() == [1, 1, 0, 0, 1, 1]  # ground truth untouched
    # open {2, 4}: exactly the female mask -> female, written under --as
    ck2 = _iig_checkpoint(tmp_path / "iig2.pt", [2, 4], vocab=["female", "male"])
    r = cli("annotate", "--store", s, "--from-model", ck2, "--feature", "gender", "--as", "g_hat")
    assert r.exit_code == 0, r.output
    with FaceStore(s) as st:
        assert st.attribute("g_hat")[0].tolist() == [0] * 6
    r = cli("annotate", "--store", s, "--from-model", ck2, "--feature", "gender", "--as", "gender")
    assert r.exit_code != 0 and "ground truth" in r.output


def test_from_model_refuses_models_without_masks(tmp_path, cli):
    from facetool.models import create_model, save_checkpoint

    s = tiny_store(tmp_path / "s.h5")
    plain = save_checkpoint(tmp_path / "aig.pt", create_model("aig_resnet18", num_classes=3, input_size=32, width=8))
    r = cli("annotate", "--store", s, "--from-model", plain, "--feature", "gender")
    assert r.exit_code != 0 and "mask" in r.output and len(r.output.strip().splitlines()) == 1
    ck = _iig_checkpoint(tmp_path / "iig.pt", [2], vocab=["female", "male"])
    r = cli("annotate", "--store", s, "--from-model", ck, "--feature", "age")
    assert r.exit_code != 0 and "'age'" in r.output
    r = cli("annotate", "--store", s, "--from-model", ck)
    assert r.exit_code != 0 and "--feature" in r.output


# -- issue 17: an empty cell keeps the stored value; the summary counts what the store resolves; --as ------
def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def syn_store(tmp_path) -> Path:
    """4 synthetic identities x 4 images (identity-level ground truth for gender, age, ...)."""
    from facetool.data.synthetic import prepare_synthetic

    path, _ = prepare_synthetic(tmp_path / "syn.h5", identities=4, per_identity=4, size=32)
    return path


def test_an_empty_cell_keeps_the_stored_value(syn_store, tmp_path):
    """D5: `identity,gender,age` / `synth_0001,female,` erased synth_0001's ground-truth age."""
    from conftest import run_facetool

    with FaceStore(syn_store) as s:
        age0, vocab = s.attribute("age", per_image=False)
        gender0, gvocab = s.attribute("gender", per_image=False)
    other = gvocab[1 - gender0[1]]  # a value that differs from the stored one, so the write is visible
    csv = write(tmp_path / "wide.csv", f"identity,gender,age\nsynth_0001,{other},\n")
    r = run_facetool("annotate", "--store", syn_store, csv)
    assert r.returncode == 0, r.stderr
    long = write(tmp_path / "long.csv", "identity,feature,value\nsynth_0002,age,\nsynth_0002,gender,unknown\n")
    r = run_facetool("annotate", "--store", syn_store, long)
    assert r.returncode == 0, r.stderr
    with FaceStore(syn_store) as s:
        age, vals = s.attribute("age", per_image=False)
        assert vals == vocab and age.tolist() == age0.tolist() and age0[1] != -1  # both empty cells kept the age
        gender, _ = s.attribute("gender", per_image=False)
        assert gvocab[gender[1]] == other and gender[2] == -1  # a written value, and an explicit unknown, still count
    digest = _sha(syn_store)
    empty = write(tmp_path / "empty.csv", "identity,gender,age\nsynth_0001,,\n")
    r = run_facetool("annotate", "--store", syn_store, empty)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "no values" in r.stderr and _sha(syn_store) == digest


def test_the_per_image_summary_counts_values_as_the_store_resolves_them(syn_store, tmp_path):
    """The summary said "unknown 15" for a per-image gender while every image still had its identity's."""
    from conftest import run_facetool

    csv = write(tmp_path / "img.csv", "source,gender\nsynth_0000/0000,male\nsynth_0003/0002,female\n")
    r = run_facetool("annotate", "--store", syn_store, csv, "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a.json").read_text())["features"]["gender"]
    with FaceStore(syn_store) as s:
        codes, vals = s.attribute("gender")
    assert res["level"] == "image" and res["annotated"] == 2
    assert res["counts"] == {v: int((codes == i).sum()) for i, v in enumerate(vals)} | {"unknown": 0}
    assert sum(res["counts"].values()) == 16
    assert "unknown 0" in r.stdout and "unknown 14" not in r.stdout


def test_as_does_not_replace_an_existing_attribute_without_overwrite(tmp_path, cli):
    from conftest import run_facetool

    s = tiny_store(tmp_path / "s.h5")
    ck = _iig_checkpoint(tmp_path / "iig.pt", [2, 4], vocab=["female", "male"])
    argv = ["annotate", "--store", s, "--from-model", ck, "--feature", "gender", "--as", "g_hat"]
    assert cli(*argv).exit_code == 0
    digest = _sha(s)
    r = run_facetool(*argv)
    assert r.returncode == 2 and r.stderr.startswith("error: --as g_hat: the store already has") and \
        r.stderr.count("\n") == 1 and "--overwrite" in r.stderr, r.stderr
    assert _sha(s) == digest
    assert cli(*argv, "--overwrite").exit_code == 0
