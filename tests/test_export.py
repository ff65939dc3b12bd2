"""ONNX export: insightface loads it as a recognition model; embeddings match PyTorch; bad files fail."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from facetool.data.transforms import normalize
from facetool.errors import FacetoolError
from facetool.export import export_onnx
from facetool.io import OUTPUTS_MANIFEST
from facetool.models import create_model, load_model, save_checkpoint
from facetool.models.onnx_model import OnnxModel


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A narrow IR-ResNet-18 at 112 px with non-trivial BatchNorm statistics, saved as a checkpoint."""
    torch.manual_seed(0)
    m = create_model("iresnet18", width=16, embedding_size=128)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("export") / "r18.pt"
    save_checkpoint(path, m)
    return path, m.eval()


def _faces(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8) for i in range(n)]


def test_export_loads_in_insightface_and_matches_pytorch(r18, tmp_path):
    from insightface.model_zoo import get_model

    ckpt, model = r18
    out = tmp_path / "r18.onnx"
    report = export_onnx(ckpt, out, dynamic_batch=True)
    assert out.is_file() and report["insightface_recognition"] and report["max_abs_diff_normalised"] < 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["embedding_size"] == 128
    # no temp files left (the hidden record of this command's outputs is not a temp file)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != OUTPUTS_MANIFEST) == ["r18.json", "r18.onnx"]

    zoo = get_model(str(out), providers=["CPUExecutionProvider"])
    assert type(zoo).__name__ == "ArcFaceONNX" and zoo.taskname == "recognition"
    assert (zoo.input_mean, zoo.input_std, zoo.input_size) == (127.5, 127.5, (112, 112))
    bgr = _faces(3)
    theirs = torch.from_numpy(zoo.get_feat(bgr))  # insightface: BGR uint8 -> its own blob
    with torch.no_grad():
        ours = model(normalize(np.stack([im[:, :, ::-1] for im in bgr])))
    unit = torch.nn.functional.normalize
    assert (unit(theirs) - unit(ours)).abs().max() < 1e-4
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-4

    onnx_model = load_model(out)  # the facetool model call contract
    assert isinstance(onnx_model, OnnxModel) and onnx_model.output_kind == "embedding"
    assert onnx_model.embedding_size == 128
    assert (unit(onnx_model(normalize(np.stack(bgr)[..., ::-1].copy()))) - unit(ours)).abs().max() < 1e-4


def test_fixed_batch_export_runs_any_batch(r18, tmp_path):
    ckpt, model = r18
    out = tmp_path / "fixed.onnx"
    export_onnx(ckpt, out)
    m = OnnxModel(out)
    assert m.fixed_batch == 1
    x = normalize(np.stack(_faces(3)))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(x))
    assert (torch.nn.functional.normalize(m(x)) - ref).abs().max() < 1e-4


def _export_plain(module: torch.nn.Module, x: torch.Tensor, path, outputs: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, input_names=["x"], output_names=outputs)


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean((2, 3))


def test_non_recognition_onnx_is_refused(tmp_path):
    _export_plain(torch.nn.Linear(10, 4), torch.randn(1, 10), tmp_path / "linear.onnx", ["y"])
    with pytest.raises(FacetoolError, match="not a recognition model: needs one 4-D image input") as e:
        load_model(tmp_path / "linear.onnx")
    assert "\n" not in str(e.value)
    _export_plain(_TwoHeads(), torch.randn(1, 3, 16, 16), tmp_path / "det.onnx", ["map", "vec"])
    with pytest.raises(FacetoolError, match="needs one 2-D embedding output"):
        OnnxModel(tmp_path / "det.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(FacetoolError, match="not a loadable ONNX model"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(FacetoolError, match="not found"):
        load_model(tmp_path / "missing.onnx")


def test_export_cli(cli, r18, tmp_path):
    ckpt, _ = r18
    out = tmp_path / "cli.onnx"
    res = cli("export", "--model", ckpt, "--out", out, "--dynamic-batch")
    assert res.exit_code == 0, res.output
    assert out.is_file() and "max_abs_diff_normalised" in res.output
    res = cli("export", "--model", ckpt, "--out", out)
    assert res.exit_code == 2 and "exists" in res.output and "--overwrite" in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    res = cli("export", "--model", bad, "--out", tmp_path / "bad.onnx")
    assert res.exit_code != 0 and "checkpoint" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad.onnx").exists()
    res = cli("export", "--model", ckpt, "--out", tmp_path / "x.txt")
    assert res.exit_code != 0 and ".onnx" in res.output


def test_aig_export_keeps_per_sample_gate_decisions(tmp_path):
    """AIG skips blocks per sample at inference; the exported graph must reproduce every sample's own
    decisions (not those of the trace's probe), and the caller's model keeps skipping afterwards."""
    from facetool.trainers.aig import gated_blocks

    torch.manual_seed(0)
    m = create_model("aig_resnet18", num_classes=5, input_size=32, width=8).eval()
    for b in gated_blocks(m):  # strong, unbiased gates: decisions differ from sample to sample
        torch.nn.init.normal_(b.gate.fc2.weight, 0.0, 3.0)
        b.gate.fc2.bias.data.zero_()
    x = torch.randn(6, 3, 32, 32)
    x[:3] += 0.5
    x[3:] -= 0.5
    with torch.no_grad():
        _, internals = m(x, return_internals=True)
    g = internals["gates"]
    assert ((g.sum(0) > 0) & (g.sum(0) < len(x))).any(), "test needs a block with mixed decisions"
    with pytest.raises(FacetoolError, match="is a classifier.*--features penultimate"):
        export_onnx(m, tmp_path / "refused.onnx")  # class logits are never written as `embedding`
    assert not (tmp_path / "refused.onnx").exists()
    report = export_onnx(m, tmp_path / "aig.onnx", dynamic_batch=True, features="logits")
    assert report["max_abs_diff_normalised"] < 1e-4 and report["output"] == "logits"
    assert not report["insightface_recognition"]
    assert all(b.skip for b in gated_blocks(m))
    onnx_model = OnnxModel(tmp_path / "aig.onnx", providers=["CPUExecutionProvider"])
    assert onnx_model.output_kind == "classification"  # no embedding command takes it for an embedder
    got = onnx_model(x)
    torch.testing.assert_close(got, m(x), atol=1e-4, rtol=1e-4)
