"""`prepare celeba` and `annotate --fairface` on fixtures written in the exact published layouts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_facetool
from facetool.errors import FacetoolError
from facetool.store import FaceStore

CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
FILES = [f"{i:06d}.jpg" for i in range(1, 8)]
PARTITION = [0, 0, 0, 1, 2, 2, 0]  # 000004 is validation
IDS = ["2880", "2937", "2880", "8692", "5805", "2937", "2880"]


def _values(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    v = rng.choice([-1, 1], 40)
    v[20] = 1 if i % 2 else -1  # Male alternates
    return v


def _lm(i: int) -> np.ndarray:
    base = np.array([[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]], np.float32)
    return base + np.random.default_rng(100 + i).uniform(-3, 3, (5, 2)).astype(np.float32)


def write_celeba(root: Path, *, missing: str | None = "000007.jpg", header: list[str] | None = None,
                 count: int | None = None, bad_value: bool = False) -> Path:
    """CelebA layout: count line, header, rows with variable spacing; partition; landmarks; identities."""
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(FILES, start=1):
        if f == missing:
            continue
        rng = np.random.default_rng(i)
        img = rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)
        cv2.imwrite(str(img_dir / f), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    names = header or CELEBA_ATTRS
    lines = [str(len(FILES) if count is None else count), " ".join(names) + " "]
    for i, f in enumerate(FILES, start=1):
        vals = [str(v) for v in _values(i)]
        if bad_value and i == 3:
            vals[5] = "0"
        lines.append(f + " " + "".join(f"{'  ' if v == '1' else ' '}{v}" for v in vals))  # CelebA's padding
    (root / "list_attr_celeba.txt").write_text("\r\n".join(lines) + "\r\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(FILES, PARTITION)))
    lm_lines = [str(len(FILES)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                                 "rightmouth_x rightmouth_y"]
    for i, f in enumerate(FILES, start=1):
        lm_lines.append(f"{f:<10}" + "".join(f"{int(round(v)):>6}" for v in _lm(i).ravel()))
    (root / "list_landmarks_align_celeba.txt").write_text("\n".join(lm_lines) + "\n")
    (root / "identity_CelebA.txt").write_text("".join(f"{f} {k}\n" for f, k in zip(FILES, IDS)))
    return root


def test_prepare_celeba_exact_layout(tmp_path):
    from facetool.data.celeba import prepare_celeba
    from facetool.detect.align import align_5pt, template, transform_points

    root = write_celeba(tmp_path / "CelebA")
    path, rep = prepare_celeba(root, tmp_path / "celeba.h5", size=64)
    assert rep["dropped"] == {"missing file": 1, "val skipped": 1}
    with FaceStore(path) as s:
        assert len(s) == 5 and s.attribute_names() == sorted(CELEBA_ATTRS)
        src = s.sources
        assert src == [f"img_align_celeba/{f}" for f in ("000001.jpg", "000002.jpg", "000003.jpg", "000005.jpg",
                                                         "000006.jpg")]
        # partition 0 -> train (0), 2 -> test (1); the original partition is kept
        assert s.split.tolist() == [0, 0, 0, 1, 1] and s.meta("partition").tolist() == [0, 0, 0, 2, 2]
        for name_i in (0, 20, 39):
            codes, vocab = s.attribute(CELEBA_ATTRS[name_i])
            assert vocab == ["no", "yes"]
            want = [(_values(int(x[-10:-4]))[name_i] + 1) // 2 for x in src]  # -1 -> 0 (no), 1 -> 1 (yes)
            assert codes.tolist() == want
        ids = s.identities
        assert [ids[k] for k in s.labels] == ["2880", "2937", "2880", "5805", "2937"]
        # crops: the one 5-point alignment of the landmark file's (integer) points
        img = cv2.cvtColor(cv2.imread(str(root / "img_align_celeba" / "000002.jpg")), cv2.COLOR_BGR2RGB)
        lm = np.round(_lm(2))
        crop, M = align_5pt(img, lm, 64)
        assert np.array_equal(s.images([1])[0], crop)
        np.testing.assert_allclose(s.landmarks[1], transform_points(lm, M), atol=1e-4)
        assert np.abs(s.landmarks[1] - template(64)).max() < 6.0  # near the ArcFace template
        assert s.metadata["source"] == "celeba"


def test_prepare_celeba_bad_files(tmp_path):
    from facetool.data.celeba import prepare_celeba

    root = write_celeba(tmp_path / "a", header=CELEBA_ATTRS[:39])
    with pytest.raises(FacetoolError, match="40 attributes"):
        prepare_celeba(root, tmp_path / "a.h5")
    root = write_celeba(tmp_path / "b", count=9)
    with pytest.raises(FacetoolError, match="count line says 9 images but 7 rows follow"):
        prepare_celeba(root, tmp_path / "b.h5")
    root = write_celeba(tmp_path / "c", bad_value=True)
    with pytest.raises(FacetoolError, match="line 5: attribute values must be 1 or -1, got '0'"):
        prepare_celeba(root, tmp_path / "c.h5")
    assert not any(p.suffix in (".h5", ".partial") for p in tmp_path.iterdir())
    root = write_celeba(tmp_path / "d")
    (root / "list_landmarks_align_celeba.txt").unlink()
    with pytest.raises(FacetoolError, match="list_landmarks_align_celeba.txt not found"):
        prepare_celeba(root, tmp_path / "d.h5")


def test_prepare_celeba_cli(tmp_path):
    root = write_celeba(tmp_path / "CelebA")
    out = tmp_path / "c.h5"
    r = run_facetool("prepare", "celeba", "--root", root, "--out", out, "--size", "48", "--val-split", "train")
    assert r.returncode == 0, r.stderr
    assert "val skipped" not in r.stdout and "missing file" in r.stdout
    with FaceStore(out) as s:
        assert len(s) == 6 and s.split.tolist().count(0) == 4
    r = run_facetool("prepare", "celeba", "--root", root, "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    bad = write_celeba(tmp_path / "bad", count=3)
    r = run_facetool("prepare", "celeba", "--root", bad, "--out", tmp_path / "bad.h5")
    assert r.returncode == 2 and "count line says 3" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad.h5").exists()


FAIRFACE_ROWS = [("train/1.jpg", "50-59", "Male", "East Asian"), ("train/2.jpg", "more than 70", "Female", "White"),
                 ("train/3.jpg", "3-9", "Female", "Latino_Hispanic"), ("train/99.jpg", "20-29", "Male", "Indian")]
FAIRFACE_VAL = [("val/1.jpg", "0-2", "Male", "Middle Eastern"), ("val/2.jpg", "30-39", "Female", "Southeast Asian")]


def write_fairface(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(1, n + 1):
            cv2.imwrite(str(root / split / f"{i}.jpg"), rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    files = []
    for name, rows in (("fairface_label_train.csv", FAIRFACE_ROWS), ("fairface_label_val.csv", FAIRFACE_VAL)):
        p = root / name
        p.write_text("file,age,gender,race,service_test\n" +
                     "".join(f"{f},{a},{g},{r},{'True' if i % 2 else 'False'}\n" for i, (f, a, g, r) in enumerate(rows)))
        files.append(p)
    return files[0], files[1]


def test_annotate_fairface(tmp_path):
    from facetool.data.fairface import VOCAB

    root = tmp_path / "fairface"
    train_csv, val_csv = write_fairface(root)
    store = tmp_path / "ff.h5"
    r = run_facetool("prepare", "folder", root, "--aligned", "--size", "32", "--out", store)
    assert r.returncode == 0, r.stderr
    r = run_facetool("annotate", "--store", store, "--fairface", train_csv, "--fairface", val_csv,
                     "--json", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["matched"] == 5 and res["skipped_missing_image"] == 1 and res["missing_examples"] == ["train/99.jpg"]
    assert "skipped 1 rows" in r.stdout
    want = {f: (a, g, rc) for f, a, g, rc in FAIRFACE_ROWS + FAIRFACE_VAL}
    with FaceStore(store) as s:
        for attr, k in (("age", 0), ("gender", 1), ("race", 2)):
            codes, vocab = s.attribute(attr)
            assert vocab == VOCAB[attr]
            for src, c in zip(s.sources, codes):
                assert (vocab[c] if c >= 0 else None) == (want[src][k] if src in want else None), (attr, src)
        assert s.attribute("gender")[0].tolist().count(-1) == 1  # train/4.jpg has no row
    # the attribute task sees them
    from facetool.tasks import resolve_task

    assert resolve_task("attributes", store).names == ["age", "gender", "race"]


def test_annotate_fairface_bad_input(tmp_path, cli):
    from facetool.data.folder import prepare_folder

    root = tmp_path / "fairface"
    write_fairface(root)
    store, _ = prepare_folder(root, tmp_path / "ff.h5", aligned=True, size=32)
    before = store.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,age,sex,race\ntrain/1.jpg,3-9,Male,White\n")
    r = cli("annotate", "--store", store, "--fairface", bad)
    assert r.exit_code == 2 and "lacks column(s) gender" in r.output and "Traceback" not in r.output
    bad.write_text("file,age,gender,race,service_test\ntrain/1.jpg,3-9,Male,Martian,False\n")
    r = cli("annotate", "--store", store, "--fairface", bad)
    assert r.exit_code == 2 and "race 'Martian' is not one of White, Black" in r.output
    bad.write_text("file,age,gender,race,service_test\nother/1.jpg,3-9,Male,White,False\n")
    r = cli("annotate", "--store", store, "--fairface", bad)
    assert r.exit_code == 2 and "none of the 1 FairFace rows" in r.output
    assert store.read_bytes() == before  # nothing half-written


# -- issue 17: W5 (wrong header, duplicated row) and I12 (a NaN landmark) -----------------------------------
def _sha_tree(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _replace_line(path: Path, k: int, text: str) -> None:
    """Line ``k`` (1-based) of ``path`` becomes ``text`` (the file's line endings kept)."""
    raw = path.read_bytes().decode()
    nl = "\r\n" if "\r\n" in raw else "\n"
    lines = raw.split(nl)
    lines[k - 1] = text
    path.write_text(nl.join(lines))


def _line(path: Path, k: int) -> str:
    return path.read_text().splitlines()[k - 1]


@pytest.mark.parametrize("case", ["header", "duplicate attribute row", "duplicate landmark row",
                                  "duplicate partition row"])
def test_prepare_celeba_refuses_a_wrong_header_or_a_duplicated_row(tmp_path, case):
    root = tmp_path / "CelebA"
    if case == "header":
        write_celeba(root, header=[("Mail" if n == "Male" else n) for n in CELEBA_ATTRS])
        f, expect = root / "list_attr_celeba.txt", "line 2: attribute 21 is 'Mail' but CelebA's header has 'Male'"
    elif case == "duplicate attribute row":  # row of 000005.jpg replaced by a second 000003.jpg: the count still agrees
        write_celeba(root)
        f = root / "list_attr_celeba.txt"
        _replace_line(f, 7, _line(f, 5))
        expect = "line 7: 000003.jpg is listed again (first on line 5)"
    elif case == "duplicate landmark row":
        write_celeba(root)
        f = root / "list_landmarks_align_celeba.txt"
        _replace_line(f, 4, _line(f, 3))
        expect = "line 4: 000001.jpg is listed again (first on line 3)"
    else:
        write_celeba(root)
        f = root / "list_eval_partition.txt"
        _replace_line(f, 2, "000001.jpg 2")
        expect = "line 2: 000001.jpg is listed again (first on line 1)"
    before = _sha_tree(root)
    out = tmp_path / "c.h5"
    r = run_facetool("prepare", "celeba", "--root", root, "--out", out, "--size", "32")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{f} {expect}" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "c.h5.partial").exists() and not (tmp_path / "c.json").exists()
    assert _sha_tree(root) == before


def test_prepare_celeba_skips_and_counts_rows_with_non_finite_landmarks(tmp_path):
    """I12: a NaN landmark ended in an internal error; a bad row is skipped and counted, as IMDb-Face's are."""
    root = write_celeba(tmp_path / "CelebA")
    f = root / "list_landmarks_align_celeba.txt"
    for k, bad in ((4, "nan"), (6, "inf")):  # 000002.jpg; 000004.jpg (validation, kept by --val-split train)
        toks = _line(f, k).split()
        toks[3] = bad
        _replace_line(f, k, "  ".join(toks))
    out = tmp_path / "c.h5"
    r = run_facetool("prepare", "celeba", "--root", root, "--out", out, "--size", "32", "--val-split", "train")
    assert r.returncode == 0, r.stderr
    assert "bad landmarks" in r.stdout
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["dropped"] == {"bad landmarks": 2, "missing file": 1}
    with FaceStore(out) as s:
        assert [x.rsplit("/", 1)[1] for x in s.sources] == ["000001.jpg", "000003.jpg", "000005.jpg", "000006.jpg"]


def test_prepare_folder_keeps_fairfaces_own_split(tmp_path):
    """`prepare folder FairFace/` split train/ and val/ as if they were two identities, 80/20 at random."""
    root = tmp_path / "fairface"
    write_fairface(root)
    out = tmp_path / "ff.h5"
    r = run_facetool("prepare", "folder", root, "--aligned", "--size", "32", "--out", out)
    assert r.returncode == 0, r.stderr
    with FaceStore(out) as s:
        assert s.identities == ["unknown"] and s.labels.tolist() == [0] * 6
        assert dict(zip(s.sources, s.split.tolist())) == {
            "train/1.jpg": 0, "train/2.jpg": 0, "train/3.jpg": 0, "train/4.jpg": 0, "val/1.jpg": 1, "val/2.jpg": 1}
    rep = json.loads((tmp_path / "ff.json").read_text())
    assert rep["train"] == 4 and rep["test"] == 2 and rep["settings"]["split"].startswith("fairface")
    before = _sha_tree(root)
    r = run_facetool("prepare", "folder", root, "--aligned", "--size", "32", "--per-identity", "2",
                     "--out", tmp_path / "pi.h5")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "FairFace" in r.stderr and "--per-identity" in r.stderr and not (tmp_path / "pi.h5").exists()
    assert _sha_tree(root) == before


def test_a_folder_named_like_fairface_without_its_labels_is_still_one_identity_per_folder(tmp_path):
    from facetool.data.folder import prepare_folder

    root = tmp_path / "fairface"
    for p in write_fairface(root):
        p.unlink()
    path, rep = prepare_folder(root, tmp_path / "f.h5", aligned=True, size=32)
    with FaceStore(path) as s:
        assert s.identities == ["train", "val"] and "split" not in rep["settings"]
