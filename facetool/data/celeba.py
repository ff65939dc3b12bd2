"""CelebA (aligned images + the published annotation files) -> face store.

Layout under ``--root`` (the annotation files may also sit in ``Anno/`` and ``Eval/`` as in the
official download)::

    img_align_celeba/000001.jpg ...        aligned 178x218 images
    list_attr_celeba.txt                   count line; line of 40 names; "000001.jpg  -1  1 ..." (±1)
    list_eval_partition.txt                "000001.jpg 0" (0 train, 1 val, 2 test)
    list_landmarks_align_celeba.txt        count line; header of 10 coordinate names; "file x y x y ..."
    identity_CelebA.txt                    optional: "000001.jpg 2880"

Whitespace-separated with variable spacing. Every image goes through the one preprocessing path
(``facetool.prepare.build_store``) and is 5-point aligned on its landmarks (``align_5pt``, the ArcFace
template) to ``size``. Attributes are stored as binary vocabularies ``["no", "yes"]`` (-1 -> 0,
1 -> 1). Splits: CelebA train -> store train, test -> store test; the validation partition goes to
``val_split`` (``train``, ``test`` or ``skip``); the original partition is kept as the per-image number
``meta/partition`` (0/1/2). Counters: ``missing file``, ``unreadable``, ``no landmarks``, ``bad landmarks``
(a row with nan/inf), ``not in partition``, ``val skipped``. A header that is not the published one, or an image
listed twice in any of the files, is refused naming the file and line.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from facetool.errors import FacetoolError, require_dir
from facetool.io import check_output
from facetool.store import Record

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
IMAGE_DIR = "img_align_celeba"
LANDMARK_HEADER = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                   "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y"]
#: The header (line 2) of the published ``list_attr_celeba.txt``, in its order.
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
BINARY = ["no", "yes"]
VAL_SPLITS = ("train", "test", "skip")


def find_file(root: Path, name: str, required: bool = True) -> Path | None:
    for sub in ("", "Anno", "Eval", "anno", "eval"):
        p = root / sub / name
        if p.is_file():
            return p
    if required:
        raise FacetoolError(f"CelebA file {name} not found under {root} (looked in ., Anno/, Eval/)")
    return None


def _lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise FacetoolError(f"cannot read {path}: {e}") from None
    return [ln.split() for ln in text.splitlines() if ln.strip()]


def _count_and_header(path: Path, rows: list[list[str]], expect_header: list[str] | None, what: str):
    if len(rows) < 2:
        raise FacetoolError(f"{path.name}: too short; expected a count line, a header of {what} and rows")
    if len(rows[0]) != 1 or not rows[0][0].isdigit():
        raise FacetoolError(f"{path.name}: line 1 must be the image count, got {' '.join(rows[0])[:60]!r}")
    count, header = int(rows[0][0]), rows[1]
    if expect_header is not None and header != expect_header:
        raise FacetoolError(f"{path.name}: line 2 must be the header {' '.join(expect_header)}, "
                            f"got {' '.join(header)[:120]!r}")
    body = rows[2:]
    if len(body) != count:
        raise FacetoolError(f"{path.name}: the count line says {count} images but {len(body)} rows follow")
    return count, header, body


class _Rows(dict):
    """``{file: value}`` that refuses a file named on two lines (a duplicated row is a damaged file)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.line_of = path, {}

    def put(self, file: str, value: Any, line: int) -> None:
        if file in self:
            raise FacetoolError(f"{self.path} line {line}: {file} is listed again (first on line "
                                f"{self.line_of[file]}); each image must appear once")
        self[file], self.line_of[file] = value, line


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(40 names, {file: int8 codes 0/1}) from ``list_attr_celeba.txt``; checks header, counts and that each file
    appears once."""
    _, names, body = _count_and_header(path, _lines(path), None, "attribute names")
    if len(names) != 40 or len(set(names)) != len(names) or any(n.lstrip("-").isdigit() for n in names):
        raise FacetoolError(f"{path.name}: line 2 must name the 40 attributes (5_o_Clock_Shadow ... Young), "
                            f"got {len(names)} field(s): {' '.join(names)[:80]!r}")
    if names != ATTRIBUTE_NAMES:
        k = next(k for k, (a, b) in enumerate(zip(names, ATTRIBUTE_NAMES)) if a != b)
        raise FacetoolError(f"{path} line 2: attribute {k + 1} is {names[k]!r} but CelebA's header has "
                            f"{ATTRIBUTE_NAMES[k]!r} there (the 40 published names in order: 5_o_Clock_Shadow ... "
                            "Young)")
    out = _Rows(path)
    for i, row in enumerate(body, start=3):
        if len(row) != len(names) + 1:
            raise FacetoolError(f"{path.name} line {i}: expected a file name and {len(names)} values, got {len(row)} fields")
        vals = row[1:]
        bad = [v for v in vals if v not in ("1", "-1")]
        if bad:
            raise FacetoolError(f"{path.name} line {i}: attribute values must be 1 or -1, got {bad[0]!r}")
        out.put(row[0], np.array([1 if v == "1" else 0 for v in vals], np.int8), i)
    return names, dict(out)


def read_partition(path: Path) -> dict[str, int]:
    out = _Rows(path)
    for i, row in enumerate(_lines(path), start=1):
        if len(row) != 2 or row[1] not in ("0", "1", "2"):
            raise FacetoolError(f"{path.name} line {i}: expected 'file 0|1|2' (train/val/test), got {' '.join(row)[:60]!r}")
        out.put(row[0], int(row[1]), i)
    return dict(out)


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """{file: (5, 2) points}; a row whose numbers are not finite (nan, inf) is kept as read and skipped later
    (counted as ``bad landmarks``), as a file without a row is."""
    _, _, body = _count_and_header(path, _lines(path), LANDMARK_HEADER, "10 coordinates")
    out = _Rows(path)
    for i, row in enumerate(body, start=3):
        try:
            if len(row) != 11:
                raise ValueError
            lm = np.array([float(v) for v in row[1:]], np.float32).reshape(5, 2)
        except ValueError:
            raise FacetoolError(f"{path.name} line {i}: expected a file name and 10 numbers") from None
        out.put(row[0], lm, i)
    return dict(out)


def read_identities(path: Path) -> dict[str, str]:
    out = _Rows(path)
    for i, row in enumerate(_lines(path), start=1):
        if len(row) != 2:
            raise FacetoolError(f"{path.name} line {i}: expected 'file identity', got {' '.join(row)[:60]!r}")
        out.put(row[0], row[1], i)
    return dict(out)


class _Processor:
    def __init__(self, image_dir: Path, size: int, names: list[str]) -> None:
        self.image_dir, self.size, self.names = image_dir, size, names

    def __call__(self, item: tuple) -> Record | str:
        from facetool.detect.align import align_5pt, transform_points
        from facetool.detect.retinaface import read_rgb

        file, label, split, part, codes, lm = item
        path = self.image_dir / file
        if not path.is_file():
            return "missing file"
        img = read_rgb(path)
        if img is None:
            return "unreadable"
        crop, M = align_5pt(img, lm, self.size)
        return Record(image=crop, label=label, split=split, source=f"{IMAGE_DIR}/{file}",
                      landmarks=transform_points(lm, M),
                      attributes={n: int(c) for n, c in zip(self.names, codes)}, meta={"partition": float(part)})


def prepare_celeba(root: str | Path, out: str | Path, *, size: int = 112, val_split: str = "skip",
                   limit: int | None = None, overwrite: bool = False, resume: bool = False,
                   workers: int = 1) -> tuple[Path, dict[str, Any]]:
    """Build a CelebA store (see module doc). Returns (store path, report); the report is also
    written beside the store (``<out stem>.json``)."""
    from facetool.data.imdbface import finish_report
    from facetool.detect.align import template
    from facetool.prepare import build_store

    if val_split not in VAL_SPLITS:
        raise FacetoolError(f"unknown --val-split {val_split!r}; use one of {', '.join(VAL_SPLITS)}")
    if size < 16:
        raise FacetoolError(f"--size must be >= 16, got {size}")
    if limit is not None and limit < 1:
        raise FacetoolError(f"--limit must be >= 1, got {limit}")
    root = require_dir(root, "CelebA root")
    image_dir = require_dir(root / IMAGE_DIR, "CelebA image folder (img_align_celeba)")
    out = Path(out)
    if not resume:
        check_output(out, overwrite)
    names, attrs = read_attributes(find_file(root, ATTR_FILE))
    partition = read_partition(find_file(root, PARTITION_FILE))
    landmarks = read_landmarks(find_file(root, LANDMARK_FILE))
    id_file = find_file(root, IDENTITY_FILE, required=False)
    ids = read_identities(id_file) if id_file else {}
    identities = sorted(set(ids.values()), key=lambda v: (len(v), v)) if ids else ["unknown"]
    label_of = {v: i for i, v in enumerate(identities)}
    counters: Counter[str] = Counter()
    items = []
    for file in sorted(attrs):
        if file not in partition:
            counters["not in partition"] += 1
            continue
        if file not in landmarks:
            counters["no landmarks"] += 1
            continue
        if not np.isfinite(landmarks[file]).all():
            counters["bad landmarks"] += 1
            continue
        part = partition[file]
        if part == 1 and val_split == "skip":
            counters["val skipped"] += 1
            continue
        split = 0 if part == 0 else 1 if part == 2 else (0 if val_split == "train" else 1)
        label = label_of[ids[file]] if ids and file in ids else (label_of.get("unknown", 0) if not ids else -1)
        if label < 0:
            counters["no identity"] += 1
            continue
        items.append((file, label, split, part, attrs[file], landmarks[file]))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counters.items()) if v) or "no rows"
        raise FacetoolError(f"no CelebA images to write ({reasons})")
    settings = {"dataset": "celeba", "root": str(root), "size": size, "val_split": val_split, "limit": limit,
                "align": "5-point (list_landmarks_align_celeba)", "identities_file": bool(id_file)}
    path, final = build_store(
        out, items, _Processor(image_dir, size, names),
        writer_kwargs=dict(image_size=(size, size), identities=identities,
                           attribute_values={n: BINARY for n in names}, meta_shapes={"partition": ()},
                           source="celeba", preprocessing={k: v for k, v in settings.items() if k != "root"},
                           template=template(size)),
        overwrite=overwrite, resume=resume, workers=workers, label="celeba", initial_counters=dict(counters),
        drop_empty_identities=True,
    )
    return path, finish_report(path, final, settings)
