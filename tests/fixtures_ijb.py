"""Fixture builders for the recognition-evaluation tests: an IJB layout made of synthetic faces, ``.bin``
packs written the way insightface writes them, and two tiny registered embedding models."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import torch

from facetool.models import FaceModel, register_model


class PixelEmbed(FaceModel):
    """A deterministic embedder of aligned faces: 8x8 average-pooled pixels, mean-removed, then a fixed
    random projection. ``images_seen`` counts every image it embedded (class-wide)."""

    output_kind = "embedding"
    images_seen = 0

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g) / 8.0)

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        type(self).images_seen += x.shape[0]
        f = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return f - f.mean(1, keepdim=True)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.proj


class MeanColour(FaceModel):
    """Embedding = the mean normalised RGB colour of the image (flip invariant, fully controlled)."""

    output_kind = "embedding"

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward_features(self, x: torch.Tensor, internals: dict | None = None) -> torch.Tensor:
        return x.mean((2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f * self.scale


@register_model("test_pixel_embed")
def test_pixel_embed(dim: int = 32) -> PixelEmbed:
    return PixelEmbed(dim)


@register_model("test_mean_colour")
def test_mean_colour() -> MeanColour:
    return MeanColour()


def make_ijb(root: Path, prefix: str = "ijbc", identities: int = 6, templates_per_id: int = 3,
             seed: int = 0) -> dict:
    """Write an IJB tree in the insightface layout from synthetic faces pasted into larger loose crops
    (known 5 points). Templates hold 1-3 media of 1-2 images. Also writes the NIST 1:N CSVs: gallery G1
    (first template of the first half of the identities, with SIGHTING_ID), G2 (second half, the
    7-column variant) and the probes (all other templates). Returns the ground truth."""
    from facetool.data.synthetic import identity_attributes, render_face, sample_identity

    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    attrs = identity_attributes(identities, seed)
    names, tids, mids, pts, subject_of, rows = [], [], [], [], {}, {}
    tid, mid, k = 100, 5000, 0
    for i in range(identities):
        params = sample_identity(rng, {a: int(v[i]) for a, v in attrs.items()})
        for _ in range(templates_per_id):
            subject_of[tid] = 1000 + i
            rows[tid] = []
            for _m in range(int(rng.integers(1, 4))):
                for _j in range(int(rng.integers(1, 3))):
                    face, lm, _, _ = render_face(params, rng, 112)
                    s = float(rng.uniform(0.9, 1.4))
                    fs = int(round(112 * s))
                    h, w = fs + int(rng.integers(20, 60)), fs + int(rng.integers(20, 60))
                    canvas = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                    oy, ox = int(rng.integers(0, h - fs)), int(rng.integers(0, w - fs))
                    canvas[oy: oy + fs, ox: ox + fs] = cv2.resize(face, (fs, fs), interpolation=cv2.INTER_LINEAR)
                    lm_loose = (lm + 0.5) * (fs / 112) - 0.5 + np.array([ox, oy], np.float32)
                    name = f"{k}.jpg"
                    cv2.imwrite(str(root / "loose_crop" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, 95])
                    names.append(name)
                    tids.append(tid)
                    mids.append(mid)
                    pts.append((lm_loose, float(rng.uniform(0.5, 1.0))))
                    rows[tid].append(name)
                    k += 1
                mid += 1
            tid += 1
    meta = root / "meta"
    (meta / f"{prefix}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, tids, mids)))
    (meta / f"{prefix}_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(f"{v:.2f}" for v in lm.reshape(-1)) + f" {sc:.4f}\n"
                for n, (lm, sc) in zip(names, pts)))
    tlist = sorted(subject_of)
    pairs = [(a, b, int(subject_of[a] == subject_of[b])) for i, a in enumerate(tlist) for b in tlist[i + 1:]]
    (meta / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {lab}\n" for a, b, lab in pairs))
    firsts = [t for t in tlist if (t - 100) % templates_per_id == 0]
    half = len(firsts) // 2
    _nist_csv(meta / f"{prefix}_1N_gallery_G1.csv", firsts[:half], subject_of, rows, sighting=True)
    _nist_csv(meta / f"{prefix}_1N_gallery_G2.csv", firsts[half:], subject_of, rows, sighting=False)
    _nist_csv(meta / f"{prefix}_1N_probe_mixed.csv", [t for t in tlist if t not in firsts], subject_of, rows,
              sighting=True)
    return {"names": names, "templates": np.array(tids), "medias": np.array(mids), "subject_of": subject_of,
            "pairs": np.array(pairs), "faceness": np.array([p[1] for p in pts], np.float32),
            "landmarks": np.stack([p[0] for p in pts])}


def _nist_csv(path: Path, templates: list[int], subject_of: dict, rows: dict, sighting: bool) -> None:
    cols = ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"] + (["SIGHTING_ID"] if sighting else []) + \
           ["FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT"]
    lines = [",".join(cols)]
    for t in templates:
        for n in rows[t]:
            lines.append(",".join([str(t), str(subject_of[t]), f"img/{n}"] + (["1"] if sighting else [])
                                  + ["0", "0", "112", "112"]))
    path.write_text("\n".join(lines) + "\n")


def py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """A ``(bins, issame_list)`` pickle as Python 2's cPickle writes it (protocol 2, ``str`` images as
    BINSTRING opcodes), which Python 3 can only read with ``encoding='bytes'``."""
    out = [b"\x80\x02", b"]", b"("]
    out += [b"T" + struct.pack("<I", len(b)) + b for b in bins]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def write_bin(path: Path, bins: list[bytes], issame: list[bool], py2: bool = False) -> Path:
    """Write a verification pack the way insightface does (``pickle.dump((bins, issame_list))``)."""
    data = py2_pickle(bins, issame) if py2 else pickle.dumps((bins, issame), protocol=pickle.HIGHEST_PROTOCOL)
    path.write_bytes(data)
    return path
