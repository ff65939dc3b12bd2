"""Batched embedding extraction and the HDF5 feature cache.

:func:`extract` runs a recognition model over a dataset of aligned uint8 RGB crops (decoding and
alignment happen in DataLoader workers) and returns the features of the crops and, separately, of their
horizontal flips; the protocols combine them. :class:`FeatureCache` stores these raw features under a
key made of the model file's hash, the dataset (root + file list + landmarks) hash and the
preprocessing, so a second evaluation with other aggregation switches skips extraction. Every model gets
the aligned crops at its own input size (:func:`facetool.models.features.input_size_of`; the 112-px
crops are resized, antialiased), and a classifier is refused (its logits are no embedding). Extraction
writes into ``<cache>.partial`` in chunks and resumes from there after an interruption; a finished
entry is moved into the cache file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facetool import distributed as fd
from facetool.devices import resolve_device
from facetool.errors import FacetoolError
from facetool.io import atomic_path, note_kept, partial_path, sha256_file
from facetool.models.features import input_size_of, model_label, require_embedder

#: the preprocessing every protocol here uses; part of the cache key
PREPROCESSING = "rgb112-(x-127.5)/127.5"
#: the side of the aligned crops every protocol here makes (insightface's 112 x 112)
CROP_SIZE = 112


def preprocessing(input_size: int | None, crop_size: int = CROP_SIZE) -> str:
    """The preprocessing string of the cache key for a model taking ``input_size`` px."""
    if input_size is None or input_size == crop_size:
        return PREPROCESSING
    return f"{PREPROCESSING}-resized{int(input_size)}"


def resize_to(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, 3, H, W) normalised crops at ``size`` x ``size`` (bilinear, antialiased; as is if already)."""
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)


class ImageFiles(Dataset):
    """Aligned uint8 RGB crops (size, size, 3) read from image files.

    With ``landmarks`` (N, 5, 2) each image is aligned with :func:`facetool.detect.align.align_5pt`;
    with ``detect=True`` the main face is found by RetinaFace first; otherwise the file is taken as
    already aligned and only resized to ``size`` if needed.
    """

    def __init__(self, paths: Sequence[str | Path], landmarks: np.ndarray | None = None, size: int = 112,
                 detect: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.landmarks = None if landmarks is None else np.asarray(landmarks, np.float32).reshape(-1, 5, 2)
        self.size = size
        self.detect = detect
        self._detector = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from facetool.detect.align import align_5pt
        from facetool.detect.retinaface import read_rgb

        path = self.paths[i]
        img = read_rgb(path) if os.path.isfile(path) else None
        if img is None:
            raise FacetoolError(f"cannot read image {path}")
        if self.landmarks is not None:
            img, _ = align_5pt(img, self.landmarks[i], self.size)
        elif self.detect:
            img = self._detect_align(img, path)
        elif img.shape[:2] != (self.size, self.size):
            import cv2

            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(img))

    def _detect_align(self, img: np.ndarray, path: str) -> np.ndarray:
        from facetool.detect.align import align_5pt

        if self._detector is None:
            from facetool.detect.retinaface import RetinaFace

            self._detector = RetinaFace(providers=["CPUExecutionProvider"])
        det = self._detector.detect(img)
        j = det.pick(img.shape)
        if j is None:  # insightface's fallback for undetected LFW faces: the centre crop
            import cv2

            h, w = img.shape[:2]
            s = min(h, w) // 2
            img = img[h // 2 - s // 2: h // 2 + s // 2, w // 2 - s // 2: w // 2 + s // 2]
            return cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return align_5pt(img, det.landmarks[j], self.size)[0]

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_detector"] = None  # each worker opens its own ONNX session
        return d


class ImageArray(Dataset):
    """Crops already in memory: uint8 (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i]))


def _model_call(model: Any, device: str) -> Callable[[torch.Tensor], np.ndarray]:
    if isinstance(model, torch.nn.Module):
        model.to(device)
    size = input_size_of(model)
    checked = False

    def call(x: torch.Tensor) -> np.ndarray:
        nonlocal checked
        x = resize_to(x.to(device, non_blocking=True), size)
        if checked:
            out = model(x)
        else:  # the first batch says whether this model takes these crops at all: one clear line if not
            try:
                out = model(x)
            except (RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                own = "unknown" if size is None else size
                raise FacetoolError(f"{model_label(model)} cannot embed {x.shape[-1]}x{x.shape[-2]} face crops "
                                    f"(its input size is {own}): {first[:200]}") from None
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = torch.as_tensor(out)
        if not checked:
            if out.dim() != 2:
                raise FacetoolError(f"{model_label(model)} outputs shape {tuple(out.shape)}, "
                                    "not (batch, dim) embeddings")
            checked = True
        return out.float().cpu().numpy()

    return call


def extract(
    model: Any,
    images: Dataset,
    batch_size: int = 256,
    flip: bool = True,
    device: str = "cpu",
    workers: int = 0,
    *,
    start: int = 0,
    on_batch: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None,
    sharded: bool = False,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Features of ``images[start:]`` (a dataset of uint8 (H, W, 3) RGB crops) and of their flips.

    The crops are resized to the model's input size (:func:`input_size_of`) after normalisation; a
    classifier is refused (select its pooled feature with :func:`facetool.models.features.select_features`).
    ``device`` is checked first (:func:`facetool.devices.resolve_device`). Returns ``(features, flip_features or None)`` as float32 (N, D) arrays, or, with ``on_batch``,
    streams ``on_batch(row, feats, flip_feats)`` per batch and returns None (bounded memory).

    ``sharded`` (under ``torchrun``): the batches (the same ones one process makes, so the same numbers) are
    split over the ranks (:func:`facetool.distributed.map_sharded`) and merged in index order on rank 0,
    which gets the features (``on_batch`` once, with all rows); the other ranks get None.
    """
    from facetool.data.transforms import normalize

    require_embedder(model)
    device = resolve_device(device)
    call = _model_call(model, device)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()  # e.g. called from a training callback: restored below
    if sharded and fd.sharded():
        return _extract_sharded(images, call, batch_size, flip, device, workers, start, on_batch, model, was_training)
    idx = range(start, len(images))
    loader = DataLoader(torch.utils.data.Subset(images, idx), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.startswith("cuda"),
                        persistent_workers=False)
    feats: list[np.ndarray] = []
    flips: list[np.ndarray] = []
    row = start
    with torch.inference_mode():
        try:
            for batch in loader:
                x = normalize(batch.to(device, non_blocking=True))  # uint8 travels, floats do not
                f = call(x)
                ff = call(x.flip(-1)) if flip else None
                if on_batch is not None:
                    on_batch(row, f, ff)
                else:
                    feats.append(f)
                    if ff is not None:
                        flips.append(ff)
                row += len(batch)
        except FacetoolError as e:  # one raised in a worker arrives as "Caught ... <traceback>": keep its line
            raise _worker_error(e) from None
        finally:
            if was_training:
                model.train()
    if on_batch is not None:
        return None
    if not feats:
        raise FacetoolError("no images to extract features from")
    return np.concatenate(feats), (np.concatenate(flips) if flip else None)


def _worker_error(e: FacetoolError) -> FacetoolError:
    """A FacetoolError raised in a loader worker arrives as "Caught ... <traceback>": keep its line."""
    msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if len(msg) > 1 and msg[0].startswith("Caught ") and "FacetoolError: " in msg[-1]:
        return FacetoolError(msg[-1].split("FacetoolError: ", 1)[1])
    return e


def _extract_sharded(images: Dataset, call: Callable[[torch.Tensor], np.ndarray], batch_size: int, flip: bool,
                     device: str, workers: int, start: int,
                     on_batch: Callable[[int, np.ndarray, np.ndarray | None], None] | None, model: Any,
                     was_training: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`extract` with this rank's batches only, merged in index order on rank 0."""
    from facetool.data.transforms import normalize

    n = len(images)
    mine = fd.sharded_batches(n, batch_size, start=start)
    loader = DataLoader(images, batch_sampler=[b.tolist() for b in mine], num_workers=workers,
                        pin_memory=device.startswith("cuda"), persistent_workers=False)
    batches = iter(loader)

    def one(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = normalize(next(batches).to(device, non_blocking=True))
        return call(x), (call(x.flip(-1)) if flip else None)

    with torch.inference_mode():
        try:
            res = fd.map_sharded(n, one, batch_size=batch_size, start=start)
        except FacetoolError as e:
            raise _worker_error(e) from None
        finally:
            if was_training:
                model.train()
    if res is None:
        return None
    if not res:
        raise FacetoolError("no images to extract features from")
    feats, flips = fd.concat_results(res)
    if on_batch is not None:
        on_batch(start, feats, flips)
        return None
    return feats, flips


def model_fingerprint(model: Any, path: str | Path | None = None) -> str:
    """The model's identity for the cache: its file's sha256 (+ the selected output, e.g.
    ``:penultimate``), else a hash of its config and weights."""
    path = path if path is not None else getattr(model, "path", None)  # e.g. an OnnxModel
    if path is not None and Path(path).is_file():
        features = getattr(model, "config", {}).get("features")
        return sha256_file(path) + (f":{features}" if features else "")
    h = hashlib.sha256(repr(getattr(model, "config", type(model).__name__)).encode())
    if isinstance(model, torch.nn.Module):
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(root: str | Path, files: Sequence[str], extra: np.ndarray | None = None) -> str:
    """Hash of the dataset root, its file list and e.g. the landmarks used to align it."""
    h = hashlib.sha256(str(Path(root).resolve()).encode())
    h.update("\n".join(files).encode())
    if extra is not None:
        h.update(np.ascontiguousarray(extra).tobytes())
    return h.hexdigest()


def cache_key(model_id: str, data_id: str, preprocessing: str = PREPROCESSING) -> str:
    return hashlib.sha256(json.dumps([model_id, data_id, preprocessing]).encode()).hexdigest()[:32]


def check_cache(path: str | Path, inputs: Sequence[str | Path | None] = (), option: str = "--cache") -> Path:
    """An HDF5 feature cache is read and extended by reruns, so an existing one is this command's own;
    anything else (a face store, a checkpoint, any other file) is refused and never written into."""
    from facetool.io import STORE_SUFFIXES, guard_output

    p = Path(path)
    if not p.exists():
        return guard_output(p, inputs=inputs, option=option, suffix=STORE_SUFFIXES)
    # input == cache and folder checks; a cache kept inside a dataset folder is the command's own file
    guard_output(p, inputs=[i for i in inputs if i is None or not Path(i).is_dir()], overwrite=True, option=option)
    if p.is_file():
        try:
            with h5py.File(p, "r") as f:
                ok = "format" not in f.attrs and all(
                    isinstance(f[k], h5py.Group) and "feats" in f[k] for k in f.keys())
        except OSError:
            ok = False
        if ok:
            return p
    raise FacetoolError(f"{option} {p} exists and is not a facetool feature cache (it would be written into); "
                        "give a new file name or an existing cache")


class FeatureCache:
    """HDF5 file of raw features: one group per key with ``feats`` (N, D) and ``flip`` (N, D)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)

    def get(self, key: str, flip: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
        if not self.path.exists():
            return None
        try:
            with h5py.File(self.path, "r") as f:
                if key not in f:
                    return None
                g = f[key]
                if flip and "flip" not in g:
                    return None
                return g["feats"][()], (g["flip"][()] if flip else None)
        except OSError as e:
            raise FacetoolError(f"feature cache {self.path} is not a readable HDF5 file ({e}); delete it") from None

    def extract(self, key: str, model: Any, images: Dataset, *, flip: bool = True, batch_size: int = 256,
                device: str = "cpu", workers: int = 0, progress: Callable[[int], None] | None = None,
                chunk_rows: int = 4096, sharded: bool = False) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """Cached features if present, else extract (resuming ``<cache>.partial``) and store them.

        Returns ``(features, flip_features, images_extracted_now)``. ``sharded`` (under ``torchrun``): the
        extraction is split over the ranks and rank 0 alone writes the cache (the other ranks get None).
        """
        hit = self.get(key, flip)
        split = sharded and fd.sharded()
        if hit is not None:
            if progress:
                progress(len(hit[0]))
            return None if split and not fd.is_main() else (hit[0], hit[1], 0)
        n = len(images)
        if split:
            return self._extract_sharded(key, model, images, flip, batch_size, device, workers, progress)
        f = self._open_partial(key, flip, n)
        done = int(f.attrs["rows_done"])
        if progress:
            progress(done)
        pending: list[tuple[int, np.ndarray, np.ndarray | None]] = []

        def flush() -> None:
            if not pending:
                return
            r0 = pending[0][0]
            fs = np.concatenate([p[1] for p in pending])
            if "feats" not in f:
                f.create_dataset("feats", (n, fs.shape[1]), "float32", chunks=(min(n, 1024), fs.shape[1]))
                if flip:
                    f.create_dataset("flip", (n, fs.shape[1]), "float32", chunks=(min(n, 1024), fs.shape[1]))
            f["feats"][r0: r0 + len(fs)] = fs
            if flip:
                f["flip"][r0: r0 + len(fs)] = np.concatenate([p[2] for p in pending])
            f.attrs["rows_done"] = r0 + len(fs)
            f.flush()
            pending.clear()

        def on_batch(row: int, fs: np.ndarray, ff: np.ndarray | None) -> None:
            pending.append((row, fs, ff))
            if sum(len(p[1]) for p in pending) >= chunk_rows:
                flush()
            if progress:
                progress(row + len(fs))

        try:
            extract(model, images, batch_size, flip, device, workers, start=done, on_batch=on_batch)
            flush()
        except BaseException:
            try:
                flush()  # keep what was computed: the next run resumes after it
            finally:
                f.close()
                note_kept(self.partial)
            raise
        feats, flips = f["feats"][()], (f["flip"][()] if flip else None)
        f.close()
        self._commit(key)
        return feats, flips, n - done

    def _extract_sharded(self, key: str, model: Any, images: Dataset, flip: bool, batch_size: int, device: str,
                         workers: int, progress: Callable[[int], None] | None
                         ) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """Every rank extracts its batches after the rows rank 0's ``<cache>.partial`` already holds; rank 0
        writes them and commits the entry."""
        n = len(images)
        f = self._open_partial(key, flip, n) if fd.is_main() else None
        done = fd.all_gather_object(int(f.attrs["rows_done"]) if f is not None else 0)[0]
        got: list[tuple[np.ndarray, np.ndarray | None]] = []
        try:
            extract(model, images, batch_size, flip, device, workers, start=done,
                    on_batch=lambda row, fs, ff: got.append((fs, ff)), sharded=True)
            if f is None:
                return None
            fs, ff = got[0] if got else (None, None)
            if fs is not None:
                if "feats" not in f:
                    for name in ("feats", "flip") if flip else ("feats",):
                        f.create_dataset(name, (n, fs.shape[1]), "float32", chunks=(min(n, 1024), fs.shape[1]))
                f["feats"][done:] = fs
                if flip:
                    f["flip"][done:] = ff
                f.attrs["rows_done"] = n
            feats, flips = f["feats"][()], (f["flip"][()] if flip else None)
        finally:
            if f is not None:
                f.close()
        if progress:
            progress(n)
        self._commit(key)
        return feats, flips, n - done

    def _open_partial(self, key: str, flip: bool, n: int) -> h5py.File:
        if self.partial.exists():
            try:
                f = h5py.File(self.partial, "a")
                if f.attrs.get("key") == key and bool(f.attrs.get("flip")) == flip and f.attrs.get("rows") == n:
                    return f
                f.close()
            except OSError:
                pass
            self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial, "w")
        f.attrs.update({"key": key, "flip": flip, "rows": n, "rows_done": 0})
        return f

    def _commit(self, key: str) -> None:
        """Move the finished partial entry into the cache file (atomically replaced)."""
        with atomic_path(self.path) as tmp:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as dst, h5py.File(self.partial, "r") as src:
                if key in dst:
                    del dst[key]
                g = dst.create_group(key)
                for name in ("feats", "flip"):
                    if name in src:
                        src.copy(src[name], g, name)
        self.partial.unlink()
