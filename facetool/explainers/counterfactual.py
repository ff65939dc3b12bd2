"""Counterfactual concept effects: the change of a model's output when only one generator-controlled concept
changes (``facetool dissect counterfactual``).

A synthetic store records its generator's settings (``preprocessing``: seed, identities, size, version), and
the generator draws every image from ``(seed, identity, index)``; so each stored face can be re-rendered
twice with the same identity, pose, expression, lighting, background and noise, once with the concept off
and once on (:data:`CONCEPTS`: the accessory today, and a few other things the generator controls). Both
go through the one preprocessing path (:func:`facetool.data.transforms.model_input`), and the change of
the model's output is measured per pair: the probability of the true class (``class``), of an attribute's
value (``attribute``), or the cosine between the two embeddings (``embedding``: change = 1 - cosine).
This is the direct measurement of a planted bias that unit dissection (units holding the concept and
biased to a subgroup) and relevance (relevance mass on the concept's pixels) estimate indirectly.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from facetool.errors import FacetoolError

OUTPUTS = ("class", "attribute", "embedding")


@dataclass(frozen=True)
class Concept:
    """A concept the synthetic generator controls: ``apply(params, view, on)`` returns the identity parameters
    and view with the concept set off (``on=False``) or on; ``part``: its part-mask name, if any."""

    name: str
    description: str
    apply: Callable[[Any, Any, bool], tuple[Any, Any]]
    part: str | None = None


def _accessory(p, v, on: bool):
    from facetool.data.synthetic import ACCESSORIES

    return p, dataclasses.replace(v, accessory=ACCESSORIES.index("glasses") if on else 0)


def _smile(p, v, on: bool):
    return p, dataclasses.replace(v, smile=1.0 if on else 0.0)


def _beard(p, v, on: bool):
    return dataclasses.replace(p, beard_density=0.8 if on else 0.0), v


#: generator-controlled concepts (a new one: a function of (identity params, view, on) and an entry here)
CONCEPTS: dict[str, Concept] = {
    "accessory": Concept("accessory", "glasses (bold frames) off / on", _accessory, "accessory"),
    "smile": Concept("smile", "neutral mouth / full smile", _smile, "mouth"),
    "beard": Concept("beard", "no beard / a beard of density 0.8 in the identity's hair colour", _beard, "beard"),
}


def concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise FacetoolError(f"unknown --concept {name!r}; the generator controls: {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


# ----------------------------------------------------------------------------------------------- rendering
def generator_spec(store) -> dict:
    """The generator settings a synthetic store recorded; a one-line error for any other store."""
    from facetool.data.synthetic import GENERATOR_VERSION

    pre = store.metadata.get("preprocessing") or {}
    if not isinstance(pre, dict) or pre.get("generator") != "facetool.data.synthetic":
        raise FacetoolError(f"{store.path.name} is not generator-backed: counterfactuals need a store written by "
                            "`facetool prepare synthetic` (the generator re-renders each face with and without the "
                            "concept)")
    if int(pre.get("generator_version", 0)) != GENERATOR_VERSION:
        raise FacetoolError(f"{store.path.name} was rendered by synthetic generator version "
                            f"{pre.get('generator_version')}; this facetool renders version {GENERATOR_VERSION}, "
                            "so its faces cannot be re-rendered exactly (prepare the store again)")
    return pre


def _source_index(source: str) -> tuple[int, int]:
    """``synth_0003/0012`` -> (3, 12): the generator's (identity, index) of a stored image."""
    try:
        ident, idx = source.split("/")
        return int(ident.rsplit("_", 1)[1]), int(idx)
    except (ValueError, IndexError):
        raise FacetoolError(f"store source {source!r} is not a synthetic (identity, index) name") from None


class Renderer:
    """Re-renders a synthetic store's faces from its recorded generator settings."""

    def __init__(self, spec: dict) -> None:
        from facetool.data.synthetic import make_identities

        self.seed, self.size = int(spec["seed"]), int(spec["size"])
        self.people = make_identities(int(spec["identities"]), self.seed)

    def view(self, i: int, j: int):
        """The identity's parameters, the image's view and the pixel generator's state after drawing the view
        (the same for every concept value: the view draw does not depend on the accessory)."""
        from facetool.data.synthetic import sample_view

        rng = np.random.default_rng([self.seed, 2, i, j])
        v = sample_view(rng, 0)
        return self.people[i], v, rng

    def pair(self, i: int, j: int, c: Concept) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(off image, on image, concept mask of the on image) of face (identity ``i``, index ``j``)."""
        from facetool.data.synthetic import PARTS, draw_face

        p, v, rng = self.view(i, j)
        imgs, masks = [], []
        for on in (False, True):
            pp, vv = c.apply(p, v, on)
            img, _, mask = draw_face(pp, vv, self.size, copy.deepcopy(rng))
            imgs.append(img)
            masks.append(mask)
        bit = np.uint16(1 << PARTS.index(c.part)) if c.part in PARTS else np.uint16(0)
        return imgs[0], imgs[1], (masks[1] & bit) > 0


# ----------------------------------------------------------------------------------------------- selection
def select_rows(labels: np.ndarray, candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``candidates``, balanced over identities: a seeded order inside each identity, then round robin
    over the identities (the same rows on every run with the same seed)."""
    rng = np.random.default_rng([seed, 17])
    rank = np.empty(len(candidates), np.int64)
    for lab in np.unique(labels[candidates]):
        where = np.flatnonzero(labels[candidates] == lab)
        rank[where] = rng.permutation(len(where))
    order = np.lexsort((labels[candidates], rank))
    return candidates[order[:n]]


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Scorer:
    """How one model's output is read: ``kind`` class | attribute | embedding; ``sl`` the logits of the head;
    ``targets`` per pair the column inside the head whose probability is read (class / attribute)."""

    kind: str
    sl: slice | None = None
    targets: np.ndarray | None = None
    label: str = ""


def _parse_attribute(text: str | None) -> tuple[str, str | None]:
    if not text:
        raise FacetoolError("--output attribute needs --attribute NAME (its true value) or NAME=VALUE")
    name, _, value = text.partition("=")
    return name.strip(), (value.strip() or None)


def make_scorer(model: nn.Module, output: str, attribute: str | None, store, rows: np.ndarray,
                model_name: str = "model") -> Scorer:
    """Resolve what to read from ``model`` on the store's ``rows`` (one-line errors for a mismatch)."""
    from facetool.tasks import task_of, task_slice

    if output not in OUTPUTS:
        raise FacetoolError(f"unknown --output {output!r}; use {', '.join(OUTPUTS)}")
    is_classifier = getattr(model, "output_kind", "classification") == "classification"
    if output == "embedding":
        if is_classifier:
            raise FacetoolError(f"--output embedding needs an embedding model; {model_name} is a classifier (use "
                                "--output class or attribute)")
        return Scorer("embedding", label="cosine between the pair's embeddings")
    if not is_classifier:
        raise FacetoolError(f"--output {output} needs a model with a class head; {model_name} is an embedding "
                            "model (use --output embedding)")
    task = task_of(model)
    if output == "class":
        if task.kind == "identity":
            if task.num_outputs != store.num_classes:
                raise FacetoolError(f"{model_name} predicts {task.num_outputs} identities but the store has "
                                    f"{store.num_classes}: --output class needs the store it was trained on "
                                    "(or use --output attribute / embedding)")
            return Scorer("class", slice(0, task.num_outputs), store.labels[rows].astype(np.int64),
                          "probability of the true identity")
        if task.kind != "attribute":
            raise FacetoolError(f"--output class is ambiguous for {model_name}, a multi-attribute model; use "
                                "--output attribute --attribute NAME")
        attribute = task.names[0]
    name, value = _parse_attribute(attribute)
    if task.kind == "identity" or name not in task.names:
        raise FacetoolError(f"{model_name} does not predict attribute {name!r} (its task: {task.describe()})")
    vocab = task.vocab[task.names.index(name)]
    sl = task_slice(task, name)
    if value is not None:
        if value not in vocab:
            raise FacetoolError(f"--attribute {name}={value}: {name} takes {', '.join(vocab)}")
        return Scorer(output, sl, np.full(len(rows), vocab.index(value), np.int64), f"probability of {name}={value}")
    codes, svocab = store.attribute(name)
    mapped = np.array([vocab.index(v) if v in vocab else -1 for v in svocab] + [-1])
    t = mapped[codes[rows]]
    if (t < 0).any():
        raise FacetoolError(f"{int((t < 0).sum())} of the pairs have no known {name} in the store; name the value: "
                            f"--attribute {name}=VALUE")
    return Scorer(output, sl, t, f"probability of the true {name}")


def model_scores(model: nn.Module, x_off: Tensor, x_on: Tensor, scorer: Scorer, batch: int, device) -> np.ndarray:
    """(n, 2) scores of the pairs: class/attribute probability off and on; embedding: (1, cosine)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x_off), batch):
            a = model(x_off[i:i + batch].to(device))
            b = model(x_on[i:i + batch].to(device))
            if scorer.kind == "embedding":
                cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)
                out.append(torch.stack([torch.ones_like(cos), cos], 1).cpu())
            else:
                t = torch.as_tensor(scorer.targets[i:i + batch], device=a.device)[:, None]
                pa = a[:, scorer.sl].float().softmax(1).gather(1, t)[:, 0]
                pb = b[:, scorer.sl].float().softmax(1).gather(1, t)[:, 0]
                out.append(torch.stack([pa, pb], 1).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 2))


def changes(scores: np.ndarray, kind: str) -> np.ndarray:
    """Per pair: on - off (class / attribute probability); 1 - cosine (embedding)."""
    return 1.0 - scores[:, 1] if kind == "embedding" else scores[:, 1] - scores[:, 0]


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, stat: Callable = np.mean,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (seeded; (nan, nan) without resamples)."""
    if n_boot <= 0 or len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, 23])
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = stat(values[idx], axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarise(delta: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean change and mean absolute change with their bootstrap intervals."""
    lo, hi = bootstrap_ci(delta, n_boot, seed)
    alo, ahi = bootstrap_ci(np.abs(delta), n_boot, seed)
    return {"n": int(len(delta)), "effect": float(delta.mean()) if len(delta) else float("nan"),
            "ci_low": lo, "ci_high": hi,
            "abs_effect": float(np.abs(delta).mean()) if len(delta) else float("nan"), "abs_ci_low": alo,
            "abs_ci_high": ahi}


# ----------------------------------------------------------------------------------------------- the command
def _grid_png(path: Path, off: np.ndarray, on: np.ndarray, deltas: dict[str, np.ndarray], shown: int) -> Path:
    """Pairs side by side: one column per pair, the concept off (top) and on (bottom), each model's change
    written under it."""
    import cv2

    from facetool.io import atomic_path

    k = min(shown, len(off))
    size = off.shape[1]
    scale = max(1, 96 // size)
    tile = size * scale
    text_h = 14 * max(1, len(deltas))
    cols = []
    for i in range(k):
        a = cv2.resize(off[i], (tile, tile), interpolation=cv2.INTER_NEAREST)
        b = cv2.resize(on[i], (tile, tile), interpolation=cv2.INTER_NEAREST)
        txt = np.full((text_h, tile, 3), 255, np.uint8)
        for m, (name, d) in enumerate(deltas.items()):
            cv2.putText(txt, f"{name[:6]} {d[i]:+.2f}", (2, 11 + 14 * m), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1,
                        cv2.LINE_AA)
        cols.append(np.concatenate([a, b, txt], 0))
        cols.append(np.full((2 * tile + text_h, 2, 3), 255, np.uint8))
    grid = np.concatenate(cols[:-1] or [np.zeros((tile, tile, 3), np.uint8)], 1)
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if not ok:
            raise FacetoolError(f"could not encode {path}")
        tmp.write_bytes(buf.tobytes())
    return path


def _model_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the run folder's name, else the file stem; numbered if they repeat."""
    names = [p.parent.name if p.stem == "model" and p.parent.name else p.stem for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


def counterfactual(models: Sequence[str | Path], store_path: str | Path, out: str | Path | None, *,
                   concept_name: str = "accessory", pairs: int = 64, output: str = "class",
                   attribute: str | None = None, subgroups: str | None = None, split: str = "all",
                   bootstrap: int = 1000, seed: int = 0, batch_size: int = 64, shown: int = 8,
                   device: str | None = "cpu", arch: str | None = None, overwrite: bool = False) -> dict:
    """``facetool dissect counterfactual``: render ``pairs`` faces of a synthetic store with the concept off and
    on, score every model on both, and report the change overall and per subgroup with bootstrap intervals.
    Writes ``counterfactual.json``, ``pairs.csv``, ``effects.csv`` and ``pairs.png`` to ``out`` (if given).
    Models are ranked by their mean absolute change (the signed mean can cancel across subgroups)."""
    import pandas as pd

    from facetool.data.sources import face_source
    from facetool.data.transforms import model_input
    from facetool.devices import resolve_device
    from facetool.errors import require_file
    from facetool.io import guard_output, write_json, write_text
    from facetool.models.checkpoint import load_model
    from facetool.store import FaceStore

    if not models:
        raise FacetoolError("give --model or --compare")
    model_paths = [Path(m) for m in models]
    store_path = Path(store_path)
    c = concept(concept_name)
    if output not in OUTPUTS:
        raise FacetoolError(f"unknown --output {output!r}; use {', '.join(OUTPUTS)}")
    if output != "attribute" and attribute:
        raise FacetoolError("--attribute goes with --output attribute")
    for m in model_paths:
        require_file(m, "--model")
    require_file(store_path, "--store")
    if out is not None:
        guard_output(Path(out), inputs=(*model_paths, store_path), overwrite=overwrite, is_dir=True)
    dev = resolve_device(device)

    with FaceStore(face_source(store_path)) as st:
        spec = generator_spec(st)
        candidates = st.indices(split)
        if len(candidates) == 0:
            raise FacetoolError(f"the {split} split of {store_path.name} is empty")
        labels = st.labels
        rows = np.sort(select_rows(labels, candidates, pairs, seed))
        sources = st.sources
        group_codes = group_vocab = None
        if subgroups:
            group_codes, group_vocab = st.attribute(subgroups)
        loaded, scorers = [], []
        names = _model_names(model_paths)
        for m, name in zip(model_paths, names):
            model = load_model(m, name=arch)
            if not isinstance(model, nn.Module):
                raise FacetoolError(f"{m.name}: counterfactuals need a facetool torch model (not ONNX)")
            loaded.append(model.to(dev).eval())
            scorers.append(make_scorer(model, output, attribute, st, rows, m.name))

    renderer = Renderer(spec)
    offs, ons, concept_px = [], [], []
    for r in rows:
        a, b, mask = renderer.pair(*_source_index(sources[int(r)]), c)
        offs.append(a)
        ons.append(b)
        concept_px.append(float(mask.mean()))
    off, on = np.stack(offs), np.stack(ons)
    groups = (np.array([group_vocab[k] if k >= 0 else "unknown" for k in group_codes[rows]])
              if group_codes is not None else np.array(["all"] * len(rows)))

    per_model: dict[str, dict] = {}
    deltas: dict[str, np.ndarray] = {}
    table = pd.DataFrame({"index": rows, "identity": labels[rows], "source": [sources[int(r)] for r in rows],
                          "concept_pixels": np.round(concept_px, 5)})
    if subgroups:
        table[subgroups] = groups
    for model, scorer, name in zip(loaded, scorers, names):
        size = int(getattr(model, "input_size", 0) or model.config.get("input_size", 112))
        scores = model_scores(model, model_input(off, size), model_input(on, size), scorer, batch_size, dev)
        d = changes(scores, scorer.kind)
        deltas[name] = d
        overall = summarise(d, bootstrap, seed)
        sub = {}
        if subgroups:
            for g in sorted(set(groups.tolist())):
                sub[g] = summarise(d[groups == g], bootstrap, seed)
        per_model[name] = {"path": str(model_paths[names.index(name)]), "score": scorer.label, **overall,
                           "subgroups": sub}
        if scorer.kind == "embedding":
            table[f"{name} cosine"] = np.round(scores[:, 1], 6)
        else:
            table[f"{name} off"] = np.round(scores[:, 0], 6)
            table[f"{name} on"] = np.round(scores[:, 1], 6)
        table[f"{name} change"] = np.round(d, 6)
    ranking = sorted(per_model, key=lambda n: -per_model[n]["abs_effect"])
    res = {"concept": c.name, "concept_description": c.description, "output": output,
           "score": scorers[0].label, "change": "1 - cosine" if output == "embedding" else "on - off",
           "store": str(store_path), "split": split, "pairs": int(len(rows)), "bootstrap": int(bootstrap),
           "seed": int(seed), "subgroups": subgroups, "models": per_model, "ranking": ranking,
           "concept_pixels": float(np.mean(concept_px)), "files": []}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        eff = [{"model": n, "subgroup": "all", **{k: v for k, v in per_model[n].items()
                                                  if k not in ("subgroups", "path", "score")}}
               for n in ranking]
        eff += [{"model": n, "subgroup": g, **s} for n in ranking for g, s in per_model[n]["subgroups"].items()]
        write_text(out / "pairs.csv", table.to_csv(index=False))
        write_text(out / "effects.csv", pd.DataFrame(eff).to_csv(index=False))
        _grid_png(out / "pairs.png", off, on, deltas, shown)
        res["files"] = ["counterfactual.json", "effects.csv", "pairs.csv", "pairs.png"]
        write_json(out / "counterfactual.json", res)
    return res
