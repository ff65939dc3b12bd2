"""Export a facetool model to ONNX, verified against PyTorch with ONNX Runtime.

The file takes one input ``input`` (B, 3, S, S) RGB normalised ``(x - 127.5) / 127.5`` and has one
output ``embedding`` (B, D): exactly what insightface's model zoo routes to ``ArcFaceONNX``
(square input, S >= 112 and a multiple of 16; no ``Sub``/``Mul`` preprocessing nodes, so it
normalises with mean 127.5 and std 127.5). The facetool config rides along as ONNX metadata.

Only embeddings are written as ``embedding``: a classifier (ResNet / AIG with a class head) is refused
unless ``features`` asks for its pooled penultimate feature (``penultimate``, written as
``embedding``) or for its class logits (``logits``, written as an output named ``logits``, which no
embedding command accepts).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetool.errors import FacetoolError, clip_message
from facetool.io import atomic_path, write_json
from facetool.models.features import input_size_of


#: opsets torch's TorchScript exporter (the one used here) can write
OPSETS = (7, 20)


def check_export_options(out: str | Path, opset: int) -> None:
    if Path(out).suffix.lower() != ".onnx":
        raise FacetoolError(f"--out must end in .onnx, got {out}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise FacetoolError(f"--opset must be in {OPSETS[0]}..{OPSETS[1]}, got {opset}")


def report_path(out: str | Path) -> Path:
    """The JSON report beside the exported model: ``r50.onnx`` -> ``r50.json``."""
    return Path(out).with_suffix(".json")


def insightface_compatible(input_size: int) -> bool:
    """Whether insightface's ``model_zoo.get_model`` routes this input size to recognition."""
    return input_size >= 112 and input_size % 16 == 0


def export_onnx(
    model: torch.nn.Module | str | Path,
    out: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    atol: float = 1e-4,
    seed: int = 0,
    features: str = "embedding",
    arch: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` (a module or a checkpoint path) to ``out``; before the file appears, verify
    that the L2-normalised ONNX embeddings match PyTorch's within ``atol`` (max absolute difference;
    raw outputs of untrained IR-ResNets reach ~1e3, so the raw difference is reported relative).
    ``features`` selects the output (:func:`facetool.models.features.select_features`); ``arch`` names
    the architecture of a bare state_dict no matcher recognises. Returns a report, also written to
    ``out`` with suffix ``.json``."""
    from facetool.models.features import select_features

    check_export_options(out, opset)
    source = str(model) if isinstance(model, (str, Path)) else getattr(model, "name", type(model).__name__)
    if isinstance(model, (str, Path)):
        if Path(model).suffix.lower() == ".onnx":
            raise FacetoolError(f"{model} is already an ONNX file")
        from facetool.models import load_model

        model = load_model(model, name=arch)
    model = select_features(getattr(model, "module", model), features).float().cpu().eval()
    # Gated (AIG) blocks skip work per sample at inference, a data-dependent path a trace would freeze
    # for the probe; the exported graph multiplies by the gate instead (same outputs, traceable).
    from facetool.models.gated import set_skipping

    with set_skipping(model, False):
        return _export(model, out, source, opset, dynamic_batch, atol, seed, features)


def _export(model, out, source: str, opset: int, dynamic_batch: bool, atol: float, seed: int,
            features: str = "embedding") -> dict:
    import onnx

    from facetool.models.onnx_model import OnnxModel

    config = dict(getattr(model, "config", {}))
    size = int(input_size_of(model) or 112)
    output = "logits" if features == "logits" else "embedding"
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise FacetoolError(f"--out must end in .onnx, got {out}")
    gen = torch.Generator().manual_seed(seed)
    batch = 3 if dynamic_batch else 1
    probe = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        ref = model(probe).float()
    if ref.dim() != 2:
        raise FacetoolError(f"model output has shape {tuple(ref.shape)}; only (B, D) outputs can be exported")
    axes = {"input": {0: "batch"}, output: {0: "batch"}} if dynamic_batch else None
    with atomic_path(out) as tmp:
        tmp_onnx = tmp.with_name(tmp.name + ".onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (probe[:1],), str(tmp_onnx), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=[output], dynamic_axes=axes,
                                  do_constant_folding=True)
            proto = onnx.load(str(tmp_onnx))
            meta = proto.metadata_props.add()
            meta.key, meta.value = "facetool_config", json.dumps(config, default=str)
            meta = proto.metadata_props.add()
            meta.key, meta.value = "facetool_output", output
            onnx.save(proto, str(tmp))
        except FacetoolError:
            raise
        except Exception as e:  # the exporter raises many types; make it one line
            raise FacetoolError(f"ONNX export failed (opset {opset}): {type(e).__name__}: {clip_message(e) or '-'}") from None
        finally:
            tmp_onnx.unlink(missing_ok=True)
        got = OnnxModel(tmp, providers=["CPUExecutionProvider"])(probe)
        unit = torch.nn.functional.normalize
        diff = float((unit(got) - unit(ref)).abs().max())
        rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if not np.isfinite(diff) or diff > atol:
            raise FacetoolError(f"ONNX embeddings differ from PyTorch by {diff:.2e} > {atol:g}; not written")
    report = {
        "source": source, "onnx": str(out), "opset": opset, "dynamic_batch": dynamic_batch,
        "input_size": size, "output": output, "features": features, "output_size": int(ref.shape[1]),
        "embedding_size": int(ref.shape[1]) if output == "embedding" else None,
        "max_abs_diff_normalised": diff, "max_rel_diff_raw": rel,
        "insightface_recognition": output == "embedding" and insightface_compatible(size), "config": config,
    }
    write_json(report_path(out), report)
    return report
