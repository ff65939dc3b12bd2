"""RecordIO packs (``.rec``/``.idx``, facetool.data.recordio): byte-exact framing, both pack layouts read
back equal to the source folder, corrupt packs refused in one line, per-worker file handles, `prepare rec`,
`info` and training with ``--store X.rec``."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetool.data.recordio import MAGIC_BYTES, IRHeader, RecordPack, frame, pack, unpack, write_rec
from facetool.errors import FacetoolError

from conftest import run_facetool

IDS, PER = 4, 5
SIZE = 112


def _face(i: int, k: int) -> np.ndarray:
    """A smooth, distinct 112x112 RGB image (identity i, image k) that PNG stores small."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = 127 + 120 * np.sin(x / (7 + i) + k)
    g = 127 + 120 * np.cos(y / (5 + k) + i)
    b = (x * (i + 1) + y * (k + 2)) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def _with_magic(png: bytes) -> bytes:
    """``png`` with a private ancillary chunk holding the RecordIO magic twice at 4-byte-aligned payload
    offsets (after the header 24, signature 8, IHDR chunk 25, chunk head 8 and 3 filler bytes: 68 and 76):
    dmlc splits such a record in three parts."""
    data = b"pad" + MAGIC_BYTES + b"faTe" + MAGIC_BYTES
    import zlib

    chunk = struct.pack(">I", len(data)) + b"faTe" + data + struct.pack(">I", zlib.crc32(b"faTe" + data))
    return png[:33] + chunk + png[33:]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder of identities: ``<root>/id<i>/<k>.png`` (RGB on disk as PNG, written through cv2 as BGR)."""
    root = tmp_path_factory.mktemp("recsrc") / "faces"
    for i in range(IDS):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(PER):
            cv2.imwrite(str(root / f"id{i}" / f"{k}.png"), _face(i, k)[:, :, ::-1])
    return root


def _source_items(root: Path) -> list[tuple[int, bytes, np.ndarray]]:
    """(label, file bytes, RGB pixels) in folder order; every third file carries the magic (multi-part)."""
    items = []
    for i, d in enumerate(sorted(root.iterdir())):
        for n, f in enumerate(sorted(d.iterdir())):
            data = f.read_bytes()
            if (i * PER + n) % 3 == 0:
                data = _with_magic(data)
            rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            items.append((i, data, rgb))
    return items


def write_ranges_pack(root: Path, rec: Path) -> list[tuple[int, bytes, np.ndarray]]:
    """insightface's layout: images at keys 1..N, record 0 = [N+1, N+1+M], one record per identity
    with the [start, end) of its image keys."""
    items = _source_items(root)
    n = len(items)
    recs = [(0, pack(IRHeader(2, (n + 1, n + 1 + IDS))))]
    recs += [(k + 1, pack(IRHeader(0, float(lab), k + 1), data)) for k, (lab, data, _) in enumerate(items)]
    start = 1
    for i in range(IDS):
        cnt = sum(1 for lab, _, _ in items if lab == i)
        recs.append((n + 1 + i, pack(IRHeader(2, (start, start + cnt)))))
        start += cnt
    write_rec(rec, recs, num_classes=IDS, image_size=(SIZE, SIZE))
    return items


def write_shuffled_pack(root: Path, rec: Path, seed: int = 0) -> tuple[list, np.ndarray]:
    """A shuffled pack (scripts/shuffle_rec.py): no record 0, keys 0..N-1 in a random order of the images,
    labels in the headers (every other one as a flag-2 label vector [label, 0.5]); no property file."""
    items = _source_items(root)
    perm = np.random.default_rng(seed).permutation(len(items))
    recs = []
    for key, j in enumerate(perm.tolist()):
        lab, data, _ = items[j]
        h = IRHeader(0, float(lab), key) if key % 2 == 0 else IRHeader(2, (float(lab), 0.5), key)
        recs.append((key, pack(h, data)))
    write_rec(rec, recs)
    return items, perm


# -- known bytes (REFERENCE "Scale-out", RecordIO) ------------------------------------------------------
def test_header_and_framing_known_bytes():
    assert pack(IRHeader(0, 1.0, 5, 0)).hex() == "00000000" "0000803f" "0500000000000000" "0000000000000000"
    payload = bytes(range(29))
    framed = frame(payload)
    assert framed[:8].hex() == "0a23d7ce" "1d000000" and framed[8:37] == payload and framed[37:] == b"\0\0\0"
    assert len(framed) == 40 and len(frame(b"12345678")) == 16
    rec0 = pack(IRHeader(2, (4, 6)))  # record 0 of 3 images (keys 1-3) and 2 identities (keys 4, 5)
    assert len(rec0) == 32 and rec0[-8:].hex() == "00008040" "0000c040" and rec0[:4] == b"\2\0\0\0"
    h, rest = unpack(rec0)
    assert h == IRHeader(2, (4.0, 6.0), 0, 0) and rest == b""


def test_multipart_framing_splits_at_aligned_magic_only():
    p = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij" + MAGIC_BYTES  # the last copy is not aligned
    f = frame(p)
    assert f == (MAGIC_BYTES + struct.pack("<I", 1 << 29 | 4) + b"abcd"
                 + MAGIC_BYTES + struct.pack("<I", 2 << 29 | 4) + b"efgh"
                 + MAGIC_BYTES + struct.pack("<I", 3 << 29 | 6) + b"ij" + MAGIC_BYTES[:4] + b"\0\0")


# -- read back equal to the source ------------------------------------------------------------------------
def test_ranges_pack_reads_back_the_source(source, tmp_path):
    from facetool.data import open_dataset

    items = write_ranges_pack(source, tmp_path / "train.rec")
    pk = RecordPack(tmp_path / "train.rec")
    assert pk.identity_ranges == [(1 + i * PER, 1 + (i + 1) * PER) for i in range(IDS)]
    assert pk.count_multipart() == sum(1 for j in range(len(items)) if j % 3 == 0) == 7
    assert pk.num_classes == IDS and pk.image_size == (SIZE, SIZE)
    for row, (lab, data, rgb) in enumerate(items):
        key = int(pk.keys[row])
        assert pk.read(key)[24:] == data  # parts joined, magic re-inserted: the exact payload
        assert np.array_equal(pk.image(key), rgb) and pk.labels[row] == lab
    ds = open_dataset(tmp_path / "train.rec", None)
    assert len(ds) == len(items) and ds.num_classes == IDS
    it = ds[3]
    expect = items[3][2].transpose(2, 0, 1).astype(np.float32)
    assert np.allclose(it["image"].numpy(), (expect - 127.5) / 127.5) and int(it["label"]) == items[3][0]
    tr, te = open_dataset(tmp_path / "train.rec", "train"), open_dataset(tmp_path / "train.rec", "test")
    assert len(tr) + len(te) == len(items) and not set(tr.indices) & set(te.indices)
    assert all((te.labels[te.indices] == i).sum() == 1 for i in range(IDS))  # round(5 * 0.2) per identity


def test_shuffled_pack_reads_back_the_source(source, tmp_path):
    from facetool.data import open_dataset

    items, perm = write_shuffled_pack(source, tmp_path / "s.rec")
    pk = RecordPack(tmp_path / "s.rec")
    assert pk.identity_ranges is None and pk.property is None and list(pk.keys) == list(range(len(items)))
    for key, j in enumerate(perm.tolist()):
        assert np.array_equal(pk.image(key), items[j][2]) and pk.labels[key] == items[j][0]
    ds = open_dataset(tmp_path / "s.rec", None)
    assert ds.num_classes == IDS and ds.image_size == (SIZE, SIZE)
    assert sorted(np.bincount(ds.labels).tolist()) == [PER] * IDS


def test_worker_processes_reopen_the_pack(source, tmp_path):
    """Forked DataLoader workers each open their own handle (os.getpid changes): same items as in-process."""
    import torch

    from facetool.data import make_loader, open_dataset

    write_ranges_pack(source, tmp_path / "train.rec")
    ds = open_dataset(tmp_path / "train.rec", None)
    ds[0]  # the parent opens its handle before the fork: the workers must not share it
    ref = [ds[i] for i in range(len(ds))]
    got = list(make_loader(ds, 3, workers=2))
    images = torch.cat([b["image"] for b in got])
    assert torch.equal(images, torch.stack([r["image"] for r in ref]))
    assert torch.equal(torch.cat([b["index"] for b in got]), torch.arange(len(ds)))
    assert torch.equal(torch.cat([b["label"] for b in got]), torch.stack([r["label"] for r in ref]))


# -- corrupt packs: one line, exit 2 --------------------------------------------------------------------
def _corrupt(tmp_path: Path, source: Path, how: str) -> Path:
    rec = tmp_path / how / "train.rec"
    write_ranges_pack(source, rec)
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    key, off = lines[3].split("\t")
    if how == "beyond":
        lines[3] = f"{key}\t{rec.stat().st_size + 8}"
    elif how == "max":
        lines[3] = f"{key}\t{2**64 - 1}"
    elif how == "text":
        lines[3] = f"{key}\tabc"
    elif how == "shifted":
        lines[3] = f"{key}\t{int(off) + 4}"
    if how == "truncated":
        data = rec.read_bytes()
        rec.write_bytes(data[:-10])
    else:
        idx.write_text("\n".join(lines) + "\n")
    return rec


@pytest.mark.parametrize("how, words", [("beyond", "outside train.rec"), ("max", "18446744073709551615"),
                                        ("text", "not 'key<TAB>offset'"), ("truncated", "truncated"),
                                        ("shifted", "bad magic")])
def test_corrupt_pack_is_one_line(source, tmp_path, how, words):
    rec = _corrupt(tmp_path, source, how)
    with pytest.raises(FacetoolError, match="record|line") as e:
        ds = __import__("facetool.data", fromlist=["open_dataset"]).open_dataset(rec, None)
        [ds.pack.read(int(k)) for k in ds.pack.keys]
    assert words in str(e.value) and "\n" not in str(e.value) and str(rec.name.split(".")[0]) in str(e.value)


def test_corrupt_pack_cli_exit_2(source, tmp_path):
    for how in ("max", "truncated", "shifted"):
        rec = _corrupt(tmp_path, source, how)
        r = run_facetool("prepare", "rec", "--rec", rec, "--out", tmp_path / how / "s.h5")
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "train.rec" in lines[0] and "record" in lines[0] and "Traceback" not in r.stderr


# -- commands on a pack -------------------------------------------------------------------------------------
def test_prepare_rec_info_and_train(source, tmp_path):
    """prepare rec gives a store with the source's exact pixels and labels and the pack's split; info
    describes the pack; train arcface reads the pack directly."""
    from facetool.data import open_dataset
    from facetool.store import FaceStore

    items = write_ranges_pack(source, tmp_path / "pack" / "train.rec")
    rec = tmp_path / "pack" / "train.rec"
    r = run_facetool("info", rec, "--json")
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert info["images"] == IDS * PER and info["identities"] == IDS and info["multi-part records"] == 7
    assert info["identity ranges (record 0)"] is True and info["image size"] == "112x112"
    r = run_facetool("prepare", "rec", "--rec", rec, "--out", tmp_path / "s.h5")
    assert r.returncode == 0, r.stderr
    with FaceStore(tmp_path / "s.h5") as s:
        assert len(s) == len(items) and s.num_classes == IDS
        imgs = s.f["images"][:]
        labels = s.labels
        split = s.f["split"][:]
    assert all(np.array_equal(imgs[j], items[j][2]) and labels[j] == items[j][0] for j in range(len(items)))
    te = open_dataset(rec, "test")
    assert np.array_equal(np.flatnonzero(split == 1), te.indices)
    r = run_facetool("prepare", "rec", "--rec", rec, "--out", tmp_path / "sub.h5", "--identities", 2,
                     "--per-identity", 3, "--size", 64)
    assert r.returncode == 0, r.stderr
    with FaceStore(tmp_path / "sub.h5") as s:
        assert len(s) == 6 and s.num_classes == 2 and tuple(s.image_size) == (64, 64)
    r = run_facetool("train", "arcface", "--store", rec, "--network", "r18", "--embedding-size", 32,
                     "--batch-size", 4, "--max-steps", 2, "--epochs", 1, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model.pt").is_file()


def test_path_kinds_and_raw_store_commands(source, tmp_path):
    """The CLI's light magic check is the reader's; a command that reads raw store arrays refuses a pack
    with a pointer to `prepare rec` (one line), and training --store options declare the pack kind."""
    from facetool.cli.limits import REC_MAGIC, STORE_OR_REC, path_kind
    from facetool.data import face_source

    assert REC_MAGIC == MAGIC_BYTES
    assert path_kind("train arcface", "--store") == STORE_OR_REC == path_kind("distill", "--store")
    assert path_kind("eval classify", "--store") == "store"
    write_ranges_pack(source, tmp_path / "train.rec")
    with pytest.raises(FacetoolError, match="prepare rec") as e:
        face_source(tmp_path / "train.rec")
    assert "\n" not in str(e.value)
    assert face_source(tmp_path / "train.rec", rec=True) == tmp_path / "train.rec"


def test_train_resnet_and_distill_on_a_pack(source, tmp_path):
    """--store X.rec in the classification trainer and distill (identity task); a raw-store command and an
    attribute task refuse a pack in one line (exit 2)."""
    rec = tmp_path / "pack" / "train.rec"
    write_ranges_pack(source, rec)
    small = ["--width", 4, "--input-size", 32, "--batch-size", 4, "--max-steps", 2, "--epochs", 1]
    r = run_facetool("train", "resnet", "--store", rec, "--arch", "resnet18", *small, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    r = run_facetool("distill", "none", "--student", "resnet18", "--store", rec, *small, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    for argv in (["eval", "classify", "--store", rec, "--model", tmp_path / "r" / "model.pt"],
                 ["train", "resnet", "--task", "attribute:gender", "--store", rec, "--out", tmp_path / "a"]):
        r = run_facetool(*argv)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "RecordIO pack" in r.stderr


# -- --val-fraction (the held-out share of a pack read directly) ------------------------------------------------
def test_val_fraction_splits_a_pack_per_identity_and_a_store_keeps_its_own(source, tmp_path):
    """open_dataset(pack, val_fraction=f): round(5·f) of each identity's 5 images are test (0.4 -> 2, the
    default 0.2 -> 1, 0 -> none), the same split on every call and equal to `prepare rec --test-fraction f`'s;
    a face store refuses another value than the default in one line pointing to prepare --test-fraction."""
    from facetool.data import open_dataset
    from facetool.data.sources import VAL_FRACTION, input_paths
    from facetool.store import FaceStore

    rec = tmp_path / "pack" / "train.rec"
    write_ranges_pack(source, rec)
    for f, per in ((0.4, 2), (None, 1), (0.0, 0)):
        te, tr = open_dataset(rec, "test", val_fraction=f), open_dataset(rec, "train", val_fraction=f)
        assert np.array_equal(np.bincount(te.labels[te.indices], minlength=IDS), [per] * IDS), f
        assert sorted(te.indices.tolist() + tr.indices.tolist()) == list(range(IDS * PER))
        assert np.array_equal(te.indices, open_dataset(rec, "test", val_fraction=f).indices)
    assert VAL_FRACTION == 0.2
    r = run_facetool("prepare", "rec", "--rec", rec, "--out", tmp_path / "s.h5", "--test-fraction", 0.4)
    assert r.returncode == 0, r.stderr
    with FaceStore(tmp_path / "s.h5") as s:
        split = s.f["split"][:]
    assert np.array_equal(np.flatnonzero(split == 1), open_dataset(rec, "test", val_fraction=0.4).indices)
    assert len(open_dataset(tmp_path / "s.h5", "test", val_fraction=0.2)) == 2 * IDS  # the default: its own split
    with pytest.raises(FacetoolError, match=r"--val-fraction 0.3 .*fixed at prepare time.*--test-fraction 0.3") as e:
        open_dataset(tmp_path / "s.h5", "train", val_fraction=0.3)
    assert "\n" not in str(e.value)
    with pytest.raises(FacetoolError, match=r"--val-fraction must be in \[0, 1\)"):
        open_dataset(rec, "train", val_fraction=1.0)
    assert input_paths(tmp_path / "s.h5") == (tmp_path / "s.h5",)
    assert input_paths(rec) == (rec, rec.with_suffix(".idx"), rec.parent / "property")


def test_val_fraction_option_trains_on_the_pack_split(source, tmp_path):
    """`train resnet --store X.rec --val-fraction 0.4`: 12 of the 20 images train (3 steps of 4 in one epoch,
    the default 0.2 would give 16 images, 4 steps) and config.json records it; the same option on a face store
    is one line, exit 2, pointing to prepare --test-fraction."""
    import json

    rec = tmp_path / "pack" / "train.rec"
    write_ranges_pack(source, rec)
    small = ["--arch", "resnet18", "--width", 4, "--input-size", 32, "--batch-size", 4, "--epochs", 1]
    r = run_facetool("train", "resnet", "--store", rec, *small, "--val-fraction", 0.4, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "result.json").read_text())["metrics"]["step"] == 3
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["val_fraction"] == 0.4
    from facetool.data.rec_prepare import prepare_rec

    prepare_rec(rec, tmp_path / "s.h5")
    r = run_facetool("train", "resnet", "--store", tmp_path / "s.h5", *small, "--val-fraction", 0.4,
                     "--out", tmp_path / "r2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--val-fraction" in lines[0] and "--test-fraction" in lines[0], \
        r.stderr
    assert not (tmp_path / "r2").exists()


def test_run_folder_over_a_packs_index_or_property_is_refused_as_an_input(source, tmp_path):
    """Every file of a pack given as --store (.rec, .idx, property) is an input of the command: an --out that
    names one of them is refused as an input even with --overwrite (one line, exit 2), and nothing changes."""
    from facetool.data.sources import input_paths
    from facetool.io import guard_output

    rec = tmp_path / "pack" / "train.rec"
    write_ranges_pack(source, rec)
    before = {p: p.read_bytes() for p in input_paths(rec)}
    for p in (rec.with_suffix(".idx"), rec.parent / "property"):
        with pytest.raises(FacetoolError, match="also an input"):
            guard_output(p, inputs=input_paths(rec), overwrite=True, is_dir=True, resumable=True)
    for argv in (["train", "resnet", "--arch", "resnet18"], ["train", "arcface", "--network", "r18"]):
        r = run_facetool(*argv, "--store", rec, "--out", rec.with_suffix(".idx"), "--overwrite")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "also an input" in lines[0], r.stderr
    assert {p: p.read_bytes() for p in input_paths(rec)} == before


# -- opening a big pack: headers only, vectorised ------------------------------------------------------------
def test_shuffled_pack_open_reads_headers_not_payloads(source, tmp_path, monkeypatch):
    """Opening a shuffled pack takes every label from the records' first 40 bytes (one vectorised gather):
    whole payloads are read only for the last record (truncation check), record 0 (a range record?) and the
    multi-part records (their header may be split); the labels equal the per-record headers'. Before: every record was read whole."""
    items, perm = write_shuffled_pack(source, tmp_path / "s.rec")
    calls = []
    real = RecordPack.read
    monkeypatch.setattr(RecordPack, "read", lambda self, key: calls.append(key) or real(self, key))
    pk = RecordPack(tmp_path / "s.rec")
    assert len(calls) <= 2 + pk.count_multipart() == 9 < len(items)  # + record 0 (is it a range record?)
    ref = [h.label[0] if isinstance(h.label, tuple) else h.label for h in map(pk.header, pk.keys.tolist())]
    assert pk.labels.tolist() == ref == [items[j][0] for j in perm.tolist()]
    flag, lab, second = pk.scan_headers(pk.keys)
    assert flag.tolist() == [0 if k % 2 == 0 else 2 for k in range(len(items))]
    assert np.all(second[1::2] == 0.5) and np.isnan(second[0::2]).all()


def test_index_parsed_alike_fast_and_line_by_line(source, tmp_path):
    """A regular index (key<TAB>offset lines, parsed in one numpy call) and the same index with CRLF line ends,
    a blank line and space separators (the line parser) give the same records; a later line of a repeated key
    wins; a label that is no identity number in a shuffled pack is one line naming the record."""
    from facetool.data.recordio import read_idx

    write_shuffled_pack(source, tmp_path / "s.rec")
    idx = tmp_path / "s.idx"
    size = (tmp_path / "s.rec").stat().st_size
    keys, offs = read_idx(idx, size, "s.rec")
    lines = idx.read_text().splitlines()
    idx.write_bytes(("\r\n".join(ln.replace("\t", "  ") for ln in lines[:5]) + "\r\n\r\n" +
                     "\n".join(lines[5:]) + "\n").encode())
    k2, o2 = read_idx(idx, size, "s.rec")
    assert np.array_equal(keys, k2) and np.array_equal(offs, o2) and len(keys) == IDS * PER
    idx.write_text("\n".join(lines + [f"3\t{offs[4]}"]) + "\n")  # key 3 again, at record 4's offset
    pk = RecordPack(tmp_path / "s.rec")
    assert len(pk.keys) == IDS * PER and pk.read(3) == pk.read(4)
    idx.write_text("\n".join(lines) + "\n")
    recs = [(k, pack(IRHeader(0, float(k % IDS) if k != 5 else float("nan"), k), b"x")) for k in range(10)]
    write_rec(tmp_path / "n.rec", recs)
    with pytest.raises(FacetoolError, match=r"n.rec record 5: label nan is not an identity number") as e:
        RecordPack(tmp_path / "n.rec")
    assert "\n" not in str(e.value)


def test_jpeg_payloads_decode_as_opencv_decodes_them_in_rgb(tmp_path):
    """JPEG payloads (what MS1M/Glint packs hold; lossy, so compared with the decoder rather than the source):
    the pack's image and the dataset's raw row equal cv2.imdecode of the payload converted BGR -> RGB, for a
    whole record and for one split in parts (a COM segment holding the magic at payload offset 32)."""
    from facetool.data import open_dataset

    jpgs = []
    for i in range(3):
        ok, buf = cv2.imencode(".jpg", _face(i, i + 1)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 75])
        jpgs.append(buf.tobytes())
    com = b"\xff\xfe" + struct.pack(">H", 2 + 10) + b"xx" + MAGIC_BYTES + b"face"  # 24 + 6 + 2 = offset 32
    jpgs.append(jpgs[0][:2] + com + jpgs[0][2:])
    write_rec(tmp_path / "j.rec", [(k, pack(IRHeader(0, float(k % 2), k), data)) for k, data in enumerate(jpgs)])
    pk = RecordPack(tmp_path / "j.rec")
    assert pk.count_multipart() == 1 and pk.read(3)[24:] == jpgs[3]
    ds = open_dataset(tmp_path / "j.rec", None)
    for k, data in enumerate(jpgs):
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert not np.array_equal(want, want[:, :, ::-1])  # the channel order is visible
        assert np.array_equal(pk.image(k), want) and np.array_equal(ds.raw(k), want)
    assert np.array_equal(pk.image(3), pk.image(0))  # the comment does not change the pixels
