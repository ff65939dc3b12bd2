"""The HDF5 face store: round trip, resume, atomic output, attribute fallbacks, dataset."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from facetool.data import FaceDataset, denormalize, normalize
from facetool.errors import FacetoolError
from facetool.io import partial_path
from facetool.prepare import build_store
from facetool.store import FaceStore, Record, StoreWriter

H = W = 16


def _records(n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((H, W), np.uint16)
        mask[:4, :4] = 1 | 2  # parts a and b
        out.append(Record(
            image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8), label=i % 3, split=int(i % 5 == 4),
            source=f"id{i % 3}/img{i}.jpg", bbox=[1, 2, 3 + i, 4], landmarks=np.full((5, 2), float(i)),
            attributes={"glasses": i % 2} if i != 0 else {}, part_mask=mask, meta={"pose": [i, -i, 0.5]},
        ))
    return out


def _writer_kwargs():
    return dict(
        image_size=(H, W), identities=["ann", "bob", "cy"], attribute_values={"glasses": ["no", "yes"]},
        identity_attributes={"gender": (["female", "male"], [0, 1, -1])}, parts=["a", "b", "c"],
        meta_shapes={"pose": (3,)}, source="unit", preprocessing={"crop": "bbox"},
    )


def test_round_trip(tmp_path):
    recs = _records(7)
    path, counters = build_store(tmp_path / "s.h5", recs, lambda r: r, writer_kwargs=_writer_kwargs())
    assert counters == {}
    assert not partial_path(path).exists()
    with FaceStore(path) as s:
        assert len(s) == 7 and s.num_classes == 3 and s.image_size == (H, W)
        assert s.identities == ["ann", "bob", "cy"]
        np.testing.assert_array_equal(s.images(), np.stack([r.image for r in recs]))
        np.testing.assert_array_equal(s.images([5, 1]), np.stack([recs[5].image, recs[1].image]))
        np.testing.assert_array_equal(s.labels, [i % 3 for i in range(7)])
        assert list(s.indices("test")) == [4]
        assert s.sources[3] == "id0/img3.jpg"
        np.testing.assert_allclose(s.bboxes[6], [1, 2, 9, 4])
        np.testing.assert_allclose(s.landmarks[2], np.full((5, 2), 2.0))
        codes, vals = s.attribute("glasses")
        assert vals == ["no", "yes"] and list(codes) == [-1, 1, 0, 1, 0, 1, 0]
        # per-identity attribute broadcast to images: labels 0,1,2 -> female, male, unknown
        g, gv = s.attribute("gender")
        assert gv == ["female", "male"] and list(g) == [0, 1, -1, 0, 1, -1, 0]
        assert s.parts == ["a", "b", "c"]
        assert s.part_masks([0], "b")[0, :4, :4].all() and not s.part_masks([0], "c").any()
        np.testing.assert_allclose(s.meta("pose")[3], [3, -3, 0.5])
        md = s.metadata
        assert md["format"] == "facetool-store" and md["preprocessing"] == {"crop": "bbox"}
        summ = s.summary()
        assert summ["train"] == 6 and summ["test"] == 1
        assert summ["attributes"]["gender"] == {"female": 3, "male": 2, "unknown": 2}
        with pytest.raises(FacetoolError, match="no attribute 'age'"):
            s.attribute("age")


def test_skip_counters_and_empty_identities(tmp_path):
    recs = _records(6)

    def process(r):
        return "unreadable" if r.label == 1 else r  # identity "bob" loses every image

    path, counters = build_store(tmp_path / "s.h5", recs, process, writer_kwargs=_writer_kwargs())
    assert counters == {"unreadable": 2}
    with FaceStore(path) as s:
        assert s.identities == ["ann", "cy"]
        assert sorted(set(s.labels.tolist())) == [0, 1]
        codes, _ = s.attribute("gender", per_image=False)
        assert list(codes) == [0, -1]  # identity attributes follow the compaction


def test_existing_output_and_empty_result(tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"x")
    with pytest.raises(FacetoolError, match="--overwrite"):
        StoreWriter(out, **_writer_kwargs())
    with pytest.raises(FacetoolError, match="no images left"):
        build_store(tmp_path / "e.h5", _records(3), lambda r: "aspect", writer_kwargs=_writer_kwargs())
    assert not (tmp_path / "e.h5").exists() and not partial_path(tmp_path / "e.h5").exists()


def test_resume_after_interrupt_gives_same_store(tmp_path):
    recs = _records(40)
    full, _ = build_store(tmp_path / "full.h5", recs, lambda r: r, writer_kwargs=_writer_kwargs())
    calls = {"n": 0}

    def flaky(r):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt
        return r

    out = tmp_path / "res.h5"
    with pytest.raises(KeyboardInterrupt):
        build_store(out, recs, flaky, writer_kwargs={**_writer_kwargs(), "flush_every": 8})
    assert not out.exists() and partial_path(out).exists()
    seen = []
    path, _ = build_store(out, recs, lambda r: seen.append(r) or r, resume=True,
                          writer_kwargs={**_writer_kwargs(), "flush_every": 8})
    assert len(seen) == 40 - 22  # continued after the 22 records handled before Ctrl-C
    with FaceStore(full) as a, FaceStore(path) as b:
        np.testing.assert_array_equal(a.images(), b.images())
        np.testing.assert_array_equal(a.labels, b.labels)


def test_resume_with_other_settings_refused(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        build_store(out, _records(4), lambda r: (_ for _ in ()).throw(KeyboardInterrupt),
                    writer_kwargs=_writer_kwargs())
    kw = _writer_kwargs() | {"preprocessing": {"crop": "align"}}
    with pytest.raises(FacetoolError, match="other settings"):
        build_store(out, _records(4), lambda r: r, writer_kwargs=kw, resume=True)


def test_store_errors(tmp_path):
    with pytest.raises(FacetoolError, match="not found"):
        FaceStore(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(FacetoolError, match="corrupt"):
        FaceStore(bad)


def test_dataset_items_flip_and_normalisation(tmp_path):
    recs = _records(5)
    path, _ = build_store(tmp_path / "s.h5", recs, lambda r: r, writer_kwargs=_writer_kwargs())
    ds = FaceDataset(path, split="train", attributes=["glasses", "gender"])
    assert len(ds) == 4
    item = ds[1]
    x = normalize(recs[1].image)
    torch.testing.assert_close(item["image"], x)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].item() == 1 and item["index"].item() == 1
    assert item["attrs"].tolist() == [1, 1]
    np.testing.assert_array_equal(denormalize(item["image"][None])[0], recs[1].image)
    flipped = FaceDataset(path, split="train", flip=True)
    torch.manual_seed(0)
    seen = {tuple(flipped[0]["image"][0, 0, :2].tolist()) for _ in range(20)}
    assert len(seen) == 2  # both the image and its mirror appear
    resized = FaceDataset(path, split="all", size=8)
    assert resized[0]["image"].shape == (3, 8, 8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 3, H, W)


# -- one reader validates a store (issue 17: I2-I5, a read-only store reported as corrupt) ----------------
def _sha(p) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def _damage(path, how: str) -> None:
    import h5py

    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        return
    with h5py.File(path, "a") as f:
        if how == "no labels":
            del f["labels"]
        elif how == "2-D images":
            n = f["images"].shape[0]
            del f["images"]
            f.create_dataset("images", data=np.zeros((n, H * W * 3), np.uint8))
        elif how == "label too large":
            f["labels"][3] = 3  # 3 identities: 0..2
        elif how == "negative label":
            f["labels"][5] = -1
        elif how == "short split":
            s = f["split"][:-2]
            del f["split"]
            f.create_dataset("split", data=s)
        elif how == "short attribute":
            d = f["attributes/glasses"]
            codes, attrs = d[:-1], dict(d.attrs)
            del f["attributes/glasses"]
            f.create_dataset("attributes/glasses", data=codes).attrs.update(attrs)
        elif how == "broken names":  # the identities' references into the string heap overwritten
            off = f["identities"].id.get_offset()
    if how == "broken names":
        with open(path, "r+b") as fh:
            fh.seek(off)
            fh.write(b"\xff" * 16 * 3)


DAMAGE = {
    "truncated": "corrupt",
    "no labels": "has no 'labels' dataset",
    "2-D images": r"'images' must be uint8 \(N, H, W, 3\), got uint8 \(7, 768\)",
    "label too large": r"labels must be identity indices 0..2 \(3 identities\), but 1 row\(s\) are not \(row 3 has 3\)",
    "negative label": r"row 5 has -1",
    "short split": r"'split' has shape \(5,\), expected \(7,\)",
    "short attribute": r"'attributes/glasses' must have one row per image \(7\)",
    "broken names": "corrupt",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_store_is_refused_on_open_naming_file_and_defect(tmp_path, how):
    path, _ = build_store(tmp_path / "s.h5", _records(7), lambda r: r, writer_kwargs=_writer_kwargs())
    _damage(path, how)
    with pytest.raises(FacetoolError, match=DAMAGE[how]) as e:
        FaceStore(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_damaged_stores_through_the_cli_are_one_line_errors(tmp_path, cli):
    from conftest import run_facetool

    paths = {}
    for how in DAMAGE:
        paths[how], _ = build_store(tmp_path / f"{how.replace(' ', '_')}.h5", _records(7), lambda r: r,
                                    writer_kwargs=_writer_kwargs())
        _damage(paths[how], how)
        r = cli("info", paths[how])
        assert r.exit_code == 2, (how, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1 and str(paths[how]) in r.output, r.output
        assert "internal error" not in r.output
    for how in ("no labels", "label too large", "broken names"):  # as a user sees it: a fresh process
        r = run_facetool("info", paths[how])
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr and str(paths[how]) in r.stderr


def test_out_of_range_labels_stop_train_and_eval_before_any_work(tmp_path):
    """I5: training started, died after 11 s and left config.json; eval classify scored the store with exit 0."""
    import h5py

    from conftest import run_facetool
    from facetool.data.synthetic import prepare_synthetic
    from facetool.models import create_model, save_checkpoint

    store, _ = prepare_synthetic(tmp_path / "s.h5", identities=4, per_identity=4, size=32)
    with h5py.File(store, "a") as f:
        f["labels"][5] = 9
    digest = _sha(store)
    model = save_checkpoint(tmp_path / "m" / "model.pt",
                            create_model("resnet18", num_classes=4, width=4, input_size=32))
    for argv in (["train", "resnet", "--store", store, "--arch", "resnet18", "--width", "8", "--epochs", "1",
                  "--batch-size", "8", "--out", tmp_path / "runs" / "r"],
                 ["eval", "classify", "--store", store, "--model", model, "--json", tmp_path / "t.json"]):
        r = run_facetool(*argv, cwd=tmp_path)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert f"{store}: labels must be identity indices 0..3" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.json").exists()
    assert _sha(store) == digest


def test_a_read_only_store_is_read_and_a_write_says_read_only(tmp_path):
    import os
    import stat

    from conftest import run_facetool

    path, _ = build_store(tmp_path / "s.h5", _records(7), lambda r: r, writer_kwargs=_writer_kwargs())
    os.chmod(path, 0o444)
    digest = _sha(path)
    with FaceStore(path) as s:  # reading needs no write permission
        assert len(s) == 7
    with pytest.raises(FacetoolError, match="is read-only"):
        FaceStore(path, "a")
    csv = tmp_path / "g.csv"
    csv.write_text("identity,gender\nann,female\n")
    r = run_facetool("info", path)
    assert r.returncode == 0, r.stderr
    for extra in ([], ["--in-place"]):
        r = run_facetool("annotate", "--store", path, csv, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: face store {path} is read-only") and "corrupt" not in r.stderr
    assert _sha(path) == digest and stat.S_IMODE(path.stat().st_mode) == 0o444
