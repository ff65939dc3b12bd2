"""Learning test of CondFace (issue 18, thesis Table 5.1/5.2) on the synthetic set -- and what it found.

The issue's claim -- the routing clusters of a CondFace model have a clearly higher AMI against the cohort code
than k-means of the BL's features at the same number of clusters -- does NOT hold on the synthetic set at the
sizes a unit test (or a CPU in minutes) can train: IR-18 width 8, 32 px, K = 18 clusters, CondFace (DGConv,
k-means, MLP head, lambda 1) started from the trained BL with ``--init`` as the thesis does, on a store with
``--pose wide`` (so the cohort code's pose bins vary; the default store's pitch bin is always 2). Measured (1
thread, AMI x 100 against the cohort code; BL = offline k-means of GAP(layer2..4), CF = the model's own k-means
classifier, CF km = offline k-means of the routing vectors):

  16 ids x 40, BL 10 ep, CF 6 ep, seed 0:      BL 19.4   CF 11.1   CF km 12.6   verification BL 0.84  CF 0.80
  16 ids x 40, BL 10 ep, CF 6 ep, seed 1:      BL 12.3   CF  3.6   CF km  2.8   verification BL 0.77  CF 0.66
  24 ids x 24, BL 6 ep, CF 4 ep, seed 0:       BL 10.7   CF  8.8   CF km  8.2   verification BL 0.72  CF 0.66
  (the previous engineer, default pose, from scratch: BL 8.4 vs CF 7.9 / 8.8)

Neither model's clusters see the pose (AMI against the yaw or pitch bin <= 0.012 for both): on these images the
features and the routing cluster by age, the face-shape group and the image's colour/lighting, and the BL's
features do that at least as well as the routing. So this test asserts what holds instead, averaged over two
seeds from ``FACETOOL_TEST_SEED``: the CondFace routing clusters carry the identity attributes (AMI against
the cohort code above a chance clustering's ~0) while its verification accuracy stays within 0.2 of the BL's
(the issue's "close" does not hold either: 0.04 and 0.11 below in the runs above).
The margins measured are in :func:`test_condface_routing_clusters_carry_attributes_and_verification_stays_close`.

A second attempt mirrored the thesis's regime (many identities, few images each, K << identities, so that
k-means of the BL features cannot win by recovering identities): IR-18 width 8, ``--pose wide``, BL 6 epochs,
CondFace (DGConv, k-means, MLP head) from the BL with ``--init`` unless said, K = 18 unless said; AMI x 100
against the cohort code, BL km / CF own / CF km (verification BL / CF):

  240 ids x 4, 32 px, CF 4 ep, lambda 1, seed 0:               2.8 / 2.2 / 1.6   (0.63 / 0.64)
  the same, routing temperature 30:1:                          2.8 / 2.5 / 2.3   (0.63 / 0.65)
  the same, CondFace from scratch, 6 ep:                       2.8 / 1.8 / 1.6   (0.63 / 0.62)
  240 ids x 4, CF 8 ep, lambda 5, seed 0:                      2.8 / 3.5 / 2.7   (0.63 / 0.67)
  the same, seed 1:                                            1.9 / 2.4 / 2.5   (0.61 / 0.63)
  the same (seed 0), K = 9:                                    3.0 / 3.2 / 3.0   (0.63 / 0.67)
  the same (seed 0, K = 18), BL 12 ep:                         1.8 / 1.9 / 1.5   (0.62 / 0.66)
  400 ids x 3, CF 4 ep, lambda 1, temperature 30:1, seed 0:    2.4 / 1.8 / 2.2   (0.55 / 0.58)
  160 ids x 4, 48 px, CF 8 ep, lambda 5, seed 0:               2.4 / 2.3 / 0.4   (0.62 / 0.59)

Every AMI is near 0 (a clustering by the pose bins alone would score 50, by age x gender x group 67): the best
CondFace setting (lambda 5, 8 epochs) is ahead by 0.5 on average over two seeds, nothing a test can assert far
from its threshold. The reason is the synthetic images: their strongest image-level factor is the lighting
gain (0.55..1.35, with colour cast and background), which is not in the cohort code. Against the image's
mean-brightness tertile, k-means of both vectors has AMI 36..41 (BL 36.5 / 40.1, CondFace routing 39.7 / 39.9,
seeds 0 / 1), and a 3-fold linear probe reads the tertile at 0.93..0.97 accuracy, while the pitch bin (0.65..0.69
vs 0.68 majority), the group (0.33..0.39 vs 0.33) and yaw (0.50..0.64 vs 0.53) are at or near chance from either.
So the routing does group images by a global image statistic, as the thesis says -- but on this set that
statistic is the brightness, which the cohort code does not score; the pose that the code does score barely
changes the pooled statistics of a 32..48 px rendered face.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import learning_seeds

pytestmark = pytest.mark.slow

K, WIDTH, SIZE = 18, 8, 32


def _verification(emb: np.ndarray, labels: np.ndarray) -> float:
    """Best-threshold accuracy on all genuine pairs and as many impostor pairs (cosine of embeddings)."""
    sims = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    s, same = sims[iu], (labels[:, None] == labels[None, :])[iu]
    pos = np.flatnonzero(same)
    neg = np.random.default_rng(0).choice(np.flatnonzero(~same), len(pos), replace=False)
    s2, y = np.concatenate([s[pos], s[neg]]), np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(max(((s2 > t) == y).mean() for t in np.quantile(s2, np.linspace(0, 1, 201))))


def _run(root, seed: int) -> dict[str, float]:
    from facetool.data.sources import open_dataset
    from facetool.data.synthetic import prepare_synthetic
    from facetool.engine import TrainConfig
    from facetool.eval.clusters import cluster_scores, cohort_codes
    from facetool.models import load_model
    from facetool.trainers.arcface import train_arcface
    from facetool.trainers.condface import cluster_head, train_condface

    store, _ = prepare_synthetic(root / "s.h5", identities=12, per_identity=30, size=SIZE, seed=1000 + seed,
                                 pose="wide")
    common = dict(loss="cosface", input_size=SIZE, embedding_size=64, s=30.0, pair_eval=False)
    train_arcface(store, TrainConfig(out=root / "bl", epochs=6, batch_size=32, lr=0.1, seed=seed, verbose=False),
                  network="r18", model_kwargs={"width": WIDTH}, **common)
    train_condface(store, TrainConfig(out=root / "cf", epochs=4, batch_size=32, lr=0.05, seed=seed, verbose=False),
                   variant="dgconv", clustering="kmeans", prototypes=K, head="mlp", width=WIDTH,
                   init=root / "bl" / "model.pt", **common)
    ds = open_dataset(store, None, size=SIZE)
    bl, cf = load_model(root / "bl" / "model.pt"), load_model(root / "cf" / "model.pt")
    heads = torch.load(root / "cf" / "heads.pt", weights_only=True)
    head = cluster_head("mlp", 96)
    head.load_state_dict(heads["cluster_head"])
    head.eval()
    routing, e_bl, e_cf, labels = [], [], [], []
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(ds, batch_size=128):
            e_bl.append(F.normalize(bl(b["image"]), dim=1))
            out, internals = cf(b["image"], return_internals=True)
            e_cf.append(F.normalize(out, dim=1))
            routing.append(internals["routing"])
            labels.append(b["label"])
        own = (F.normalize(head(torch.cat(routing)), dim=1) @ heads["centroids"]["centroids"].t()).argmax(1)
    code, labels = cohort_codes(store), torch.cat(labels).numpy()
    shuffled = np.random.default_rng(seed).permutation(own.numpy())
    return {"ami": cluster_scores(code, own.numpy())["ami"], "ami_chance": cluster_scores(code, shuffled)["ami"],
            "ver_bl": _verification(torch.cat(e_bl).numpy(), labels),
            "ver_cf": _verification(torch.cat(e_cf).numpy(), labels)}


def test_condface_routing_clusters_carry_attributes_and_verification_stays_close(tmp_path):
    """Measured (mean of two seeds, 12 ids x 30, BL 6 ep, CF 4 ep; 199 s on a loaded shared core): base 0: AMI
    0.079 (threshold 0.02), chance -0.005, verification BL 0.709 CF 0.675 (gap 0.034, threshold 0.2); base 100
    (75 s): AMI 0.055, chance -0.011, verification BL 0.643 CF 0.640; base 200: not run (time)."""
    runs = [_run(tmp_path / str(s), s) for s in learning_seeds(2)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    print(mean)
    assert mean["ami"] > 0.02 and mean["ami"] > mean["ami_chance"] + 0.015, runs
    assert mean["ver_cf"] > mean["ver_bl"] - 0.2, runs
