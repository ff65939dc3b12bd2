"""MXNet RecordIO packs (``train.rec`` + ``train.idx`` [+ ``property``]) without MXNet.

MS1MV3, Glint360K and WebFace42M are distributed this way (insightface). The formats, as dmlc-core
(``include/dmlc/recordio.h``), mxnet (``python/mxnet/recordio.py``) and insightface
(``arcface_mxnet/image_iter.py``) define them:

- ``.idx``: text lines ``key<TAB>offset``, the byte offset of record ``key`` in the ``.rec``.
- a record: ``uint32 magic 0xced7230a``, ``uint32 lrec`` (length = lrec & (2^29 - 1), cflag = lrec >> 29),
  the payload, zero padding to a multiple of 4 bytes. cflag 0 is a whole record; a payload that holds
  the magic at a 4-byte-aligned position is written as parts, 1 start / 2 middle / 3 end, split at each
  such copy of the magic, which is dropped; the reader joins the parts and re-inserts it.
- a payload: ``struct 'IfQQ'`` header (flag, label, id, id2; 24 bytes); with flag > 0 the header's label
  is 0 and ``flag`` float32 labels follow; then the image (JPEG or PNG) bytes.
- record 0 (flag > 0, label [a, b]) marks identity-range packs: keys a..b-1 are one record per identity,
  label [start, end) of its image keys; images are keys 1..a-1. Shuffled packs have no record 0: every
  key is an image, its label in its header.
- ``property``: ``num_classes,height,width``.

:class:`RecordPack` reads a pack lazily: opening parses the index in one numpy pass and takes the labels from
each record's first 40 bytes, gathered from a memory map (no image is read; 20k records: 0.04 s where reading
each record took 0.25 s); the file handle is opened on first read and reopened when the
process id changes (DataLoader workers are forked; a shared file description would interleave their
seeks, mxnet#9974). Images are decoded with OpenCV and converted BGR -> RGB. :func:`write_rec` writes a
byte-exact pack (tests, fixtures). Everything that is wrong with a pack is a one-line
:class:`~facetool.errors.FacetoolError` naming the file and the record.

This module does not import torch (``facetool.data.dataset.RecDataset`` is the dataset over a pack).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from facetool.errors import FacetoolError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
LEN_MASK = (1 << 29) - 1
REC_SUFFIX = ".rec"
#: share of each identity's images held out (the test/validation split) of a pack read directly: ``prepare``'s
#: default ``--test-fraction``, so a pack and ``prepare rec``'s store of it split alike (``--val-fraction``'s
#: default; a face store carries its own split, fixed at prepare time)
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class IRHeader:
    """An image record's header. ``label`` is a float (flag 0) or a tuple of ``flag`` floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, payload: bytes = b"") -> bytes:
    """A record payload as mxnet's ``recordio.pack``: a float label gives flag 0; a sequence of labels gives
    flag = its length, header label 0 and the labels as float32 after the header."""
    if isinstance(header.label, (int, float, np.floating, np.integer)):
        return struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2) + payload
    labels = np.asarray(header.label, dtype="<f4").ravel()
    return struct.pack(IR_FORMAT, labels.size, 0.0, header.id, header.id2) + labels.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of a record payload (mxnet's ``recordio.unpack``)."""
    if len(record) < IR_SIZE:
        raise ValueError(f"payload of {len(record)} bytes is shorter than the {IR_SIZE}-byte header")
    flag, label, id_, id2 = struct.unpack(IR_FORMAT, record[:IR_SIZE])
    rest = record[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError(f"header says {flag} labels but the payload has {len(rest)} bytes after it")
        labels = tuple(float(v) for v in np.frombuffer(rest[: 4 * flag], dtype="<f4"))
        return IRHeader(flag, labels, id_, id2), rest[4 * flag:]
    return IRHeader(0, float(label), id_, id2), rest


def frame(payload: bytes) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` writes for ``payload``: split at every 4-byte-aligned
    copy of the magic (dropped) into start/middle/end parts, each ``magic, lrec, bytes``, then zero padding
    of the last part to 4 bytes."""
    n = len(payload)
    if n >= 1 << 29:
        raise FacetoolError(f"a RecordIO record holds less than 2^29 bytes, got {n}")
    out = bytearray()
    start = 0
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == MAGIC_BYTES:
            out += MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)) + payload[start:i]
            start = i + 4
    out += MAGIC_BYTES + struct.pack("<I", ((3 if start else 0) << 29) | (n - start)) + payload[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def rec_paths(rec: str | Path) -> tuple[Path, Path, Path]:
    """(``.rec``, ``.idx``, ``property``) of a pack: the index beside the data file, ``property`` in its folder."""
    p = Path(rec)
    return p, p.with_suffix(".idx"), p.parent / "property"


def write_rec(rec: str | Path, records: Iterable[tuple[int, bytes]], *, num_classes: int | None = None,
              image_size: tuple[int, int] | None = None) -> Path:
    """Write ``records`` (key, payload) to ``rec`` and its ``.idx`` (and ``property`` when ``num_classes``
    and ``image_size`` are given), framed as dmlc writes them. Payloads are built with :func:`pack`."""
    from facetool.io import atomic_path

    rec, idx, prop = rec_paths(rec)
    with atomic_path(rec) as tmp_rec, atomic_path(idx) as tmp_idx:
        with open(tmp_rec, "wb") as f, open(tmp_idx, "w") as g:
            for key, payload in records:
                g.write(f"{int(key)}\t{f.tell()}\n")
                f.write(frame(payload))
    if num_classes is not None and image_size is not None:
        with atomic_path(prop) as tmp:
            Path(tmp).write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n")
    return rec


def is_rec_path(path: str | Path) -> bool:
    """A path that names a RecordIO pack: a ``.rec`` suffix, or a file starting with the magic."""
    p = Path(path)
    if p.suffix.lower() == REC_SUFFIX:
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC_BYTES
    except OSError:
        return False


def _read_idx_fast(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, offsets) of an index whose every line is exactly ``key<TAB or SPACE>offset`` (what mxnet and
    insightface write), parsed in one numpy call; None for anything else (the line parser then reads it and
    names the bad line)."""
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if not data.strip() or b"\r" in data or b"\n\n" in data or data.count(b"\t") + data.count(b" ") != lines:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (and stops) at the first token that is not an integer
        try:
            flat = np.fromstring(data, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    if flat.size != 2 * lines:
        return None
    return flat[0::2].copy(), flat[1::2].copy()


def read_idx(idx: Path, rec_size: int, rec_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an ``.idx`` file, in file order; every offset checked against the ``.rec``'s size.
    A regular index (one ``key<TAB>offset`` per line) is parsed in one vectorised pass."""
    fast = _read_idx_fast(idx.read_bytes())
    if fast is not None:
        keys_a, offs_a = fast
        bad = (keys_a < 0) | (offs_a < 0) | (offs_a >= rec_size)
        if not bad.any():
            return keys_a, offs_a
    keys: list[int] = []
    offsets: list[int] = []
    with open(idx, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                key, off = int(parts[0]), int(parts[1])
            except ValueError:
                text = line.decode("utf-8", "replace").strip()[:60]
                raise FacetoolError(f"{idx} line {n}: {text!r} is not 'key<TAB>offset' (corrupt index)") from None
            if key < 0 or not 0 <= off < rec_size:
                raise FacetoolError(f"{idx} line {n}: record {key} at offset {off} is outside {rec_name} "
                                    f"({rec_size} bytes): corrupt or mismatched index")
            keys.append(key)
            offsets.append(off)
    if not keys:
        raise FacetoolError(f"{idx} lists no records")
    return np.asarray(keys, np.int64), np.asarray(offsets, np.int64)


class RecordPack:
    """Random access to a ``.rec``/``.idx`` pair: :meth:`read` (joined payload), :meth:`header`,
    :meth:`image` (decoded RGB uint8), and the image list: ``keys`` (image keys, in pack order), ``labels``
    (int64 per image), ``identity_ranges`` (record 0's identities, or None for a shuffled pack)."""

    def __init__(self, rec: str | Path) -> None:
        self.rec, self.idx, prop = rec_paths(rec)
        for p, what in ((self.rec, "RecordIO data file"), (self.idx, "RecordIO index (.idx beside the .rec)")):
            if not p.is_file():
                raise FacetoolError(f"{what} not found: {p}")
        self.size = self.rec.stat().st_size
        keys, offsets = read_idx(self.idx, self.size, self.rec.name)
        # key -> offset as two sorted arrays (a later line of a repeated key wins, as a dict would): a few bytes
        # per record where a dict of tens of millions of keys takes gigabytes, and cheap to pickle into workers
        last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]
        self._keys, self._offs = keys[last], offsets[last]
        self._f = None
        self._pid = -1
        self.property = _read_property(prop) if prop.is_file() else None
        self._check_tail(int(keys[np.argmax(offsets)]))
        h0 = self.header(0) if self.has(0) else None
        if h0 is not None and h0.flag > 0:
            if len(h0.label) < 2:
                raise FacetoolError(f"{self.rec} record 0: flag {h0.flag} but an identity range needs 2 labels")
            a, b = int(h0.label[0]), int(h0.label[1])
            id_keys = np.arange(a, max(a, b), dtype=np.int64)
            flag, lab0, lab1 = self.scan_headers(id_keys)
            if (flag < 2).any():
                k = int(id_keys[np.argmax(flag < 2)])
                raise FacetoolError(f"{self.rec} record {k}: an identity record needs the label [start, end)")
            ranges = list(zip(lab0.astype(np.int64).tolist(), lab1.astype(np.int64).tolist()))
            self.identity_ranges: list[tuple[int, int]] | None = ranges
            self.keys = np.concatenate([np.arange(s, e) for s, e in ranges]) if ranges else np.zeros(0, np.int64)
            self.labels = np.repeat(np.arange(len(ranges)), [e - s for s, e in ranges]).astype(np.int64)
            known = np.isin(self.keys, keys)
            if not known.all():
                k = int(self.keys[np.argmin(known)])
                raise FacetoolError(f"{self.idx}: image record {k} (in an identity range of record 0) is not in "
                                    "the index")
        else:
            self.identity_ranges = None
            self.keys = self._keys.copy()
            _, lab, _ = self.scan_headers(self.keys)
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(lab) & (lab >= 0) & (lab == np.floor(lab)))
            if bad.any():
                i = int(np.argmax(bad))
                raise FacetoolError(f"{self.rec} record {int(self.keys[i])}: label {float(lab[i])} is not an identity "
                                    "number")
            self.labels = lab.astype(np.int64)
        n = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.num_classes = max(n, self.property[0] if self.property else 0)

    # -- raw access ---------------------------------------------------------------------------------
    def has(self, key: int) -> bool:
        """Record ``key`` is in the index."""
        i = int(np.searchsorted(self._keys, key))
        return i < len(self._keys) and int(self._keys[i]) == int(key)

    def offsets(self, keys: np.ndarray) -> np.ndarray:
        """Byte offsets of records ``keys``; a key missing from the index is a one-line error."""
        keys = np.asarray(keys, np.int64)
        i = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        missing = self._keys[i] != keys
        if missing.any():
            raise FacetoolError(f"{self.idx}: record {int(keys[np.argmax(missing)])} is not in the index")
        return self._offs[i]

    #: records whose headers :meth:`scan_headers` gathers per vectorised step (bounds its index arrays)
    SCAN_CHUNK = 1 << 16

    def scan_headers(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flag, label, second label) of records ``keys`` without reading their images: the first 40 bytes of
        each record (frame head, ``IfQQ`` header, two float labels) gathered from a memory map of the ``.rec``,
        one vectorised step per :data:`SCAN_CHUNK` records, so opening a multi-million-record shuffled pack
        touches only the pages that hold headers. ``label`` is the header's label (flag 0) or the first of the
        float labels; ``second label`` the second (NaN with fewer than 2). A record that is not a whole,
        well-framed record holding its labels (bad magic, truncated, multi-part) is read through
        :meth:`header`, which joins its parts or gives the one-line error."""
        keys = np.asarray(keys, np.int64)
        n = len(keys)
        flag = np.zeros(n, np.int64)
        lab0 = np.zeros(n, np.float64)
        lab1 = np.full(n, np.nan)
        if not n:
            return flag, lab0, lab1
        offs = self.offsets(keys)
        mm = np.memmap(self.rec, np.uint8, mode="r")
        span = np.arange(40, dtype=np.int64)
        slow: list[int] = []
        try:
            for s in range(0, n, self.SCAN_CHUNK):
                o = offs[s:s + self.SCAN_CHUNK]
                b = np.ascontiguousarray(mm[np.minimum(o[:, None] + span, self.size - 1)])
                magic, lrec, fl = (b[:, j:j + 4].copy().view("<u4")[:, 0].astype(np.int64) for j in (0, 4, 8))
                ln, cflag = lrec & LEN_MASK, lrec >> 29
                ok = (magic == MAGIC) & (cflag == 0) & (o + 8 + ln <= self.size) & (fl < 1 << 20) & \
                    (ln >= IR_SIZE + 4 * np.minimum(fl, 2)) & (ln >= IR_SIZE + 4 * fl)
                f32 = [b[:, j:j + 4].copy().view("<f4")[:, 0].astype(np.float64) for j in (12, 32, 36)]
                flag[s:s + len(o)] = fl
                lab0[s:s + len(o)] = np.where(fl > 0, f32[1], f32[0])
                lab1[s:s + len(o)] = np.where(fl > 1, f32[2], np.nan)
                slow += (s + np.flatnonzero(~ok)).tolist()
        finally:
            del mm
        for i in slow:  # rare: read whole (errors are raised here, with the record named)
            h = self.header(int(keys[i]))
            labels = h.label if isinstance(h.label, tuple) else (h.label,)
            flag[i], lab0[i] = h.flag, labels[0] if labels else np.nan
            lab1[i] = labels[1] if len(labels) > 1 else np.nan
        return flag, lab0, lab1

    def _file(self):
        if self._f is None or self._pid != os.getpid():  # a forked worker opens its own file description
            self._f = open(self.rec, "rb")
            self._pid = os.getpid()
        return self._f

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = None

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_f"], d["_pid"] = None, -1  # never pickle an open file into a worker
        return d

    def _part(self, f, key: int, pos: int) -> tuple[int, bytes, int]:
        head = f.read(8)
        if len(head) < 8:
            raise FacetoolError(f"{self.rec} record {key}: truncated at byte {pos} (file ends at {self.size})")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise FacetoolError(f"{self.rec} record {key}: bad magic 0x{magic:08x} at byte {pos} "
                                f"(expected 0x{MAGIC:08x}): corrupt pack or index")
        n, cflag = lrec & LEN_MASK, lrec >> 29
        data = f.read(n)
        if len(data) < n:
            raise FacetoolError(f"{self.rec} record {key}: truncated: {n} bytes at byte {pos + 8} but the file ends "
                                f"at {self.size}")
        f.seek(-n % 4, 1)
        return cflag, data, pos + 8 + n + (-n % 4)

    def read(self, key: int) -> bytes:
        """The payload of record ``key``, parts joined with the magic re-inserted."""
        pos = int(self.offsets(np.asarray([int(key)]))[0])
        f = self._file()
        f.seek(pos)
        cflag, data, pos = self._part(f, key, pos)
        if cflag == 0:
            return data
        if cflag != 1:
            raise FacetoolError(f"{self.rec} record {key}: starts with part flag {cflag}, not a record start")
        parts = [data]
        while cflag != 3:
            cflag, data, pos = self._part(f, key, pos)
            if cflag not in (2, 3):
                raise FacetoolError(f"{self.rec} record {key}: part flag {cflag} inside a multi-part record")
            parts += [MAGIC_BYTES, data]
        return b"".join(parts)

    def header(self, key: int) -> IRHeader:
        return self._unpack(key)[0]

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack(self.read(key))
        except ValueError as e:
            raise FacetoolError(f"{self.rec} record {key}: {e}") from None

    def _check_tail(self, key: int) -> None:
        """The record at the largest offset is complete (a truncated download cuts the last one)."""
        self.read(key)

    def image(self, key: int) -> np.ndarray:
        """Record ``key``'s image as (H, W, 3) uint8 RGB (OpenCV decodes to BGR: converted)."""
        import cv2

        _, data = self._unpack(key)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise FacetoolError(f"{self.rec} record {key}: the image ({len(data)} bytes) does not decode")
        return np.ascontiguousarray(img[:, :, ::-1])

    # -- description ----------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W): the ``property`` file's, else the first image's."""
        if self.property is not None:
            return self.property[1], self.property[2]
        if not len(self.keys):
            return (0, 0)
        h, w = self.image(int(self.keys[0])).shape[:2]
        return h, w

    def count_multipart(self, keys: Sequence[int] | None = None) -> int:
        """How many of ``keys`` (default every record) are stored in several parts (reads their frame heads)."""
        f = self._file()
        n = 0
        for off in (self._offs if keys is None else self.offsets(np.asarray(keys))).tolist():
            f.seek(off)
            cflag = struct.unpack("<II", f.read(8))[1] >> 29
            n += cflag == 1
        return n

    def summary(self) -> dict:
        return {"records": len(self._keys), "images": int(len(self.keys)),
                "identities": int(len(np.unique(self.labels))), "classes": int(self.num_classes),
                "image size": "x".join(map(str, self.image_size)),
                "identity ranges (record 0)": self.identity_ranges is not None,
                "multi-part records": self.count_multipart(), "property": self.property is not None,
                "bytes": self.size}


def _read_property(path: Path) -> tuple[int, int, int]:
    text = path.read_text(errors="replace").strip()
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise FacetoolError(f"{path}: {text[:60]!r} is not 'num_classes,height,width'") from None
    return c, h, w


def split_per_identity(labels: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """0 train / 1 test per image: ``round(n·test_fraction)`` of each identity's n images are test, chosen
    as ``prepare``'s split chooses them (:func:`facetool.data.imdbface.sample_split`, identities in label
    order), so ``prepare rec --test-fraction f`` and ``--store X.rec`` split alike."""
    from facetool.data.imdbface import sample_split

    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = {int(labels[g[0]]): g.tolist() for g in np.split(order, bounds) if len(g)}
    split = np.zeros(len(labels), np.uint8)
    for items in sample_split(groups, None, test_fraction, seed).values():
        for i, s in items:
            split[i] = s
    return split
