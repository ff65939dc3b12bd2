"""ONNX recognition models (facetool exports, insightface model-zoo ``w600k_r50.onnx``, ...) as
torch-callable embedders: ``OnnxModel(path)(x) -> (B, D)`` for ``x`` a (B, 3, H, W) RGB batch
normalised ``(x - 127.5) / 127.5`` (the same input every facetool model takes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from facetool.errors import FacetoolError, require_file
from facetool.models.base import CLASSIFICATION, EMBEDDING, TASK_ALIAS


def _providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    want = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in avail:
        want.insert(0, "CUDAExecutionProvider")
    return want


class OnnxModel:
    """An ONNX Runtime embedder with the facetool model call contract (``output_kind = "embedding"``;
    ``"classification"`` for a classifier facetool exported with its ``logits`` output)."""

    output_kind = EMBEDDING
    task = TASK_ALIAS

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = require_file(path, "ONNX model")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.session = ort.InferenceSession(str(self.path), opts, providers=providers or _providers())
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FacetoolError(f"{self.path} is not a loadable ONNX model: {first[:200]}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = ", ".join(str(i.shape) for i in inputs)
            raise FacetoolError(f"{self.path} is not a recognition model: needs one 4-D image input, has {shapes or 'none'}")
        if len(outputs) != 1 or len(outputs[0].shape) != 2:
            shapes = ", ".join(str(o.shape) for o in outputs)
            raise FacetoolError(f"{self.path} is not a recognition model: needs one 2-D embedding output, has {shapes}")
        if inputs[0].type != "tensor(float)":
            raise FacetoolError(f"{self.path} is not a recognition model: input type {inputs[0].type}, expected float")
        shape = inputs[0].shape
        if isinstance(shape[1], int) and shape[1] != 3:
            raise FacetoolError(f"{self.path} is not a recognition model: input has {shape[1]} channels, expected 3")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_size = shape[2] if isinstance(shape[2], int) else 112
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        emb = outputs[0].shape[1]
        self.embedding_size = emb if isinstance(emb, int) else int(self(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1])
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        if meta.get("facetool_output") == "logits" or outputs[0].name == "logits":
            self.output_kind = CLASSIFICATION  # a facetool-exported classifier: its output is no embedding
        self.config = {"name": "onnx", "path": str(self.path)}
        self.meta: dict = {}

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise FacetoolError(f"ONNX model expects (B, 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = torch.nn.functional.interpolate(x.float(), size=(self.input_size, self.input_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        if self.fixed_batch is None:
            out = self._run(arr)
        else:  # a model exported with a fixed batch size: run it in chunks, padding the last one
            parts = []
            for i in range(0, len(arr), self.fixed_batch):
                chunk = arr[i:i + self.fixed_batch]
                pad = self.fixed_batch - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                parts.append(self._run(chunk)[: self.fixed_batch - pad])
            out = np.concatenate(parts)
        return torch.from_numpy(np.asarray(out, np.float32)).to(x.device)

    forward = __call__

    # nn.Module-like no-ops so callers can treat it as a model
    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:
        return f"OnnxModel({self.path}, input {self.input_size}px, embedding {self.embedding_size})"
