"""What a model is fed and which of its outputs an embedding command uses (issue 12, items 8 and 9):
crops at the model's own input size, classifiers refused unless --features asks for their pooled
penultimate feature (or, where it makes sense, their logits), device strings checked up front."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facetool.data.transforms import normalize
from facetool.devices import resolve_device
from facetool.errors import FacetoolError
from facetool.eval.embed import ImageArray, extract, model_fingerprint, preprocessing
from facetool.models import FaceModel, create_model, save_checkpoint
from facetool.models.features import PooledFeatures, input_size_of, select_features
from fixtures_ijb import make_ijb, write_bin
from test_verification import _pack


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb32") / "IJB"
    make_ijb(root, identities=2, templates_per_id=2, seed=1)
    return root


def _classifier(path, **kw):
    torch.manual_seed(0)
    return save_checkpoint(path, create_model("resnet18", num_classes=3, width=4, input_size=32, **kw))


def test_extract_feeds_the_model_its_own_input_size():
    torch.manual_seed(0)
    m = create_model("iresnet18", width=4, embedding_size=8, input_size=32).eval()
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    feats, flips = extract(m, ImageArray(crops), batch_size=2)
    x = torch.nn.functional.interpolate(normalize(torch.from_numpy(crops)), size=(32, 32), mode="bilinear",
                                        align_corners=False, antialias=True)
    with torch.no_grad():
        np.testing.assert_allclose(feats, m(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(flips, m(x.flip(-1)).numpy(), rtol=1e-5, atol=1e-5)
    assert input_size_of(m) == 32 and preprocessing(32) != preprocessing(112) == preprocessing(None)


class _Fixed16(FaceModel):
    """An embedder that only takes 16 x 16 inputs and does not say so."""

    output_kind = "embedding"

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 4)

    def forward_features(self, x, internals=None):
        return x.flatten(1)

    def forward_head(self, f):
        return self.fc(f)


def test_a_model_that_cannot_take_the_crops_is_one_clear_error():
    crops = np.zeros((2, 112, 112, 3), np.uint8)
    with pytest.raises(FacetoolError, match=r"cannot embed 112x112 face crops \(its input size is unknown\)") as e:
        extract(_Fixed16(), ImageArray(crops))
    assert "\n" not in str(e.value)


def test_eval_ijbc_of_a_32px_model_says_it_resized(ijb_root, tmp_path, cli):
    """A narrow `train arcface --input-size 32` model: evaluated at 32 px, not a shape error."""
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "arc32.pt", create_model("iresnet18", width=4, embedding_size=16, input_size=32))
    r = cli("eval", "ijbc", "--root", ijb_root, "--model", ck, "--out", tmp_path / "o", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "model input 32 px: the aligned 112-px crops were resized to it" in r.output
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["input_size"] == 32 and res["crop_size"] == 112


def test_pooled_features_are_the_class_heads_input_and_leave_the_model_alone():
    torch.manual_seed(0)
    m = create_model("aig_resnet18", num_classes=5, width=4, input_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
        p = select_features(m, "penultimate")
        assert isinstance(p, PooledFeatures) and p.output_kind == "embedding" and p.input_size == 32
        f = m.forward_features(x)
        emb, internals = p(x, return_internals=True)
        torch.testing.assert_close(emb, f.mean((2, 3)))  # the pooled map the class head gets
        torch.testing.assert_close(m.fc(emb), before)  # ... which the head turns into the logits
        assert emb.shape == (3, 4 * 8) and internals["gates"].shape == (3, 8)
        assert torch.equal(m(x), before)
    assert p.config["features"] == "penultimate" and "features" not in m.config


def test_selecting_features(tmp_path):
    clf = create_model("resnet18", num_classes=3, width=4, input_size=32)
    emb = create_model("iresnet18", width=4, embedding_size=8, input_size=32)
    with pytest.raises(FacetoolError, match=r"resnet18 \(3 classes\) is a classifier.*--features penultimate"):
        select_features(clf, "embedding", allowed=("embedding", "penultimate"))
    assert select_features(clf, "logits") is clf and select_features(emb, "embedding") is emb
    with pytest.raises(FacetoolError, match="has no class head"):
        select_features(emb, "logits")
    with pytest.raises(FacetoolError, match="not one of: embedding, penultimate"):
        select_features(clf, "logits", allowed=("embedding", "penultimate"))
    with pytest.raises(FacetoolError, match="is a classifier"):
        extract(clf, ImageArray(np.zeros((1, 32, 32, 3), np.uint8)))  # the library refuses too
    # the feature cache tells the two outputs of one file apart
    ck = save_checkpoint(tmp_path / "c.pt", clf)
    assert model_fingerprint(clf, ck) != model_fingerprint(select_features(clf, "penultimate"), ck)


def test_embedding_commands_refuse_a_classifier_unless_asked(tmp_path, synthetic_store, cli):
    ck = _classifier(tmp_path / "clf.pt")
    b = write_bin(tmp_path / "lfw.bin", *_pack())
    r = cli("eval", "lfw", "--bin", b, "--model", ck, "--out", tmp_path / "o", "--workers", "0")
    assert r.exit_code == 2 and "is a classifier" in r.output and "--features penultimate" in r.output
    assert not (tmp_path / "o").exists()
    r = cli("eval", "lfw", "--bin", b, "--model", ck, "--features", "penultimate", "--out", tmp_path / "o",
            "--workers", "0")
    assert r.exit_code == 0, r.output
    res = json.loads(next(q for q in (tmp_path / "o").glob("*.json") if not q.name.startswith(".")).read_text())
    assert res["input_size"] == 32 and res["pairs"] == 60
    r = cli("eval", "lfw", "--bin", b, "--model", ck, "--features", "logits")
    assert r.exit_code == 2 and "not one of: embedding, penultimate" in r.output

    r = cli("export", "--model", ck, "--out", tmp_path / "c.onnx")
    assert r.exit_code == 2 and "is a classifier" in r.output and not (tmp_path / "c.onnx").exists()

    args = ("invert", "--model", ck, "--images", synthetic_store, "--limit", 1, "--batch", 1, "--iterations", 1)
    r = cli(*args, "--out", tmp_path / "i1")
    assert r.exit_code == 2 and "is a classifier" in r.output and "--features logits" in r.output
    r = cli(*args, "--features", "penultimate", "--out", tmp_path / "i2")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "i2" / "metrics.json").read_text())["features"] == "penultimate"
    r = cli(*args, "--features", "logits", "--judge", ck, "--out", tmp_path / "i3")
    assert r.exit_code == 2 and "--judge-features penultimate" in r.output


def test_resolve_device():
    assert resolve_device("cpu") == "cpu" and resolve_device("CPU ") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda") and resolve_device(None) == resolve_device("auto")
    for bad in ("foo", "cuda:x", "gpu0", "meta"):
        with pytest.raises(FacetoolError, match="--device") as e:
            resolve_device(bad)
        assert "cpu" in str(e.value)
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(FacetoolError, match="no CUDA device here"):
                resolve_device(dev)
    else:
        with pytest.raises(FacetoolError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_arch_options_of_the_classifier_commands(tmp_path, synthetic_store, cli):
    from facetool.eval.classification import compare_classifiers

    with pytest.raises(FacetoolError, match="give --arch once per --model"):
        compare_classifiers([tmp_path / "a.pt", tmp_path / "b.pt"], synthetic_store, archs=["resnet18"])
    (tmp_path / "x.csv").write_text("identity,gender\nsynth_0000,female\n")
    r = cli("annotate", "--store", synthetic_store, tmp_path / "x.csv", "--arch", "resnet18")
    assert r.exit_code == 2 and "--arch applies to --from-model only" in r.output
    # a bare AIG state_dict runs through `eval classify` (architecture from the keys; --arch must agree)
    torch.manual_seed(0)
    torch.save(create_model("aig_resnet18", num_classes=8, width=4, input_size=32).state_dict(), tmp_path / "a.pth")
    r = cli("eval", "classify", "--store", synthetic_store, "--model", tmp_path / "a.pth", "--arch", "aig_resnet18")
    assert r.exit_code == 0, r.output
    assert "aig_resnet18" in r.output
