"""The distillation losses, each a small function unit-tested against hand-computed values, and the
per-method weights (RepDistiller's conventions for the baselines, the thesis' for SRRL; the SRRL terms
themselves are in :mod:`facetool.trainers.srrl`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from facetool.errors import FacetoolError

METHODS = ("srrl", "kd", "fitnet", "at", "rkd", "pkt", "none")


#: (gamma = CE weight, alpha = KL weight (SRRL: L_FM), beta = the method's own term (SRRL: L_SR))
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "srrl": {"gamma": 1.0, "alpha": 1.0, "beta": 1.0},
    "kd": {"gamma": 0.1, "alpha": 0.9, "beta": 0.0},
    "fitnet": {"gamma": 1.0, "alpha": 0.0, "beta": 100.0},
    "at": {"gamma": 1.0, "alpha": 0.0, "beta": 1000.0},
    "rkd": {"gamma": 1.0, "alpha": 0.0, "beta": 1.0},
    "pkt": {"gamma": 1.0, "alpha": 0.0, "beta": 30000.0},
    "none": {"gamma": 1.0, "alpha": 0.0, "beta": 0.0},
}


#: what alpha and beta weigh, per method (printed in the run's config)
WEIGHT_MEANING = {
    "srrl": ("L_FM", "L_SR"), "kd": ("KL(T)", "-"), "fitnet": ("KL(T)", "hint MSE"), "at": ("KL(T)", "AT"),
    "rkd": ("KL(T)", "RKD (25 dist + 50 angle)"), "pkt": ("KL(T)", "PKT"), "none": ("-", "-"),
}


#: methods that read the teacher's feature maps (impossible with an ONNX teacher)
NEEDS_FEATURES = ("srrl", "fitnet", "at")


#: ``distill srrl --plus kd|at`` (thesis Table 4.8, "KD+Ours" / "AT+Ours"): the SRRL loss plus the baseline's own
#: term at its standard weight (KD: 0.9 x KL at T; AT: 1000 x the attention loss); CE keeps SRRL's weight 1
PLUS_WEIGHTS: dict[str, float] = {"kd": 0.9, "at": 1000.0}


def check_plus(kind: str, plus: str | None) -> None:
    """``--plus`` adds KD or AT to SRRL only (one-line error otherwise)."""
    if plus is None:
        return
    if kind != "srrl":
        raise FacetoolError(f"--plus goes with distill srrl (SRRL + KD or AT), not {kind}")
    if plus not in PLUS_WEIGHTS:
        raise FacetoolError(f"unknown --plus {plus!r}; use one of {', '.join(PLUS_WEIGHTS)}")


RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0


PKT_EPS = 1e-7


# -- the losses ------------------------------------------------------------------------------------
def kd_loss(logits_s: Tensor, logits_t: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, averaged over the batch."""
    return soft_kd_loss(logits_s, F.softmax(logits_t.detach().float() / T, 1), T)


def soft_kd_loss(logits_s: Tensor, target: Tensor, T: float = 4.0) -> Tensor:
    """KL(target || softmax(s/T)) * T^2 for given target probabilities (mixed teacher predictions)."""
    return F.kl_div(F.log_softmax(logits_s.float() / T, 1), target.detach().float(), reduction="batchmean") * T * T


def hint_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """FitNet: mean squared error between the regressed student map and the teacher's hint map."""
    return F.mse_loss(f_s.float(), f_t.detach().float())


def attention_map(f: Tensor, p: int = 2) -> Tensor:
    """Zagoruyko & Komodakis: L2-normalised, flattened channel mean of |f|^p."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor], p: int = 2) -> Tensor:
    """Attention transfer summed over stage pairs: mean squared difference of the attention maps;
    the larger map of a pair is average-pooled to the smaller one's size."""
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(feats_s, feats_t):
        hs, ht = fs.shape[-1], ft.shape[-1]
        if hs > ht:
            fs = F.adaptive_avg_pool2d(fs, ft.shape[-2:])
        elif hs < ht:
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
        total = total + (attention_map(fs, p) - attention_map(ft.detach(), p)).pow(2).mean()
    return total


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix (zero diagonal) of the rows of ``e``."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_loss(h_s: Tensor, h_t: Tensor, w_distance: float = RKD_DISTANCE, w_angle: float = RKD_ANGLE) -> Tensor:
    """Relational KD: smooth-L1 between mean-normalised distance matrices (weight 25) plus smooth-L1
    between the cosine of every angle (anchor, i, j) (weight 50)."""
    s, t = h_s.float().flatten(1), h_t.detach().float().flatten(1)

    def normalised(e: Tensor) -> Tensor:
        d = pairwise_distances(e)
        pos = d[d > 0]
        return d / pos.mean() if pos.numel() else d

    loss_d = F.smooth_l1_loss(normalised(s), normalised(t))

    def angles(e: Tensor) -> Tensor:
        v = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # v[a, i] = unit(e_i - e_a)
        return torch.bmm(v, v.transpose(1, 2)).flatten()

    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    return w_distance * loss_d + w_angle * loss_a


def pkt_loss(h_s: Tensor, h_t: Tensor, eps: float = PKT_EPS) -> Tensor:
    """Probabilistic knowledge transfer: cosine-similarity kernels mapped to [0, 1], normalised per
    row into conditional distributions, mean of t * log((t + eps) / (s + eps))."""

    def conditional(e: Tensor) -> Tensor:
        e = e.float().flatten(1)
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        e = torch.nan_to_num(e, nan=0.0)
        k = (e @ e.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    ps, pt = conditional(h_s), conditional(h_t.detach())
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def mixup_images(x: Tensor, u: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Mix each labeled image with an unlabeled one: lambda ~ Beta(alpha, alpha) per image,
    lambda' = max(lambda, 1 - lambda) (the labeled image dominates); returns (mixed, lambda').
    Draws from torch's global generator, which the engine's resume state restores."""
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((x.shape[0],))
    lam = torch.maximum(lam, 1 - lam).to(x.device, x.dtype)
    w = lam.view(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * u, lam


def pooled(f: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1) if f.dim() == 4 else f


# -- the method ------------------------------------------------------------------------------------
def resolve_weights(kind: str, alpha: float | None = None, beta: float | None = None,
                    gamma: float | None = None) -> dict[str, float]:
    if kind not in METHODS:
        raise FacetoolError(f"unknown distillation method {kind!r}; use one of {', '.join(METHODS)}")
    w = dict(DEFAULT_WEIGHTS[kind])
    for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if v is not None:
            if not (v >= 0 and v < float("inf")):
                raise FacetoolError(f"--{k} must be a finite number >= 0, got {v}")
            if v and k != "gamma" and WEIGHT_MEANING[kind][0 if k == "alpha" else 1] == "-":
                a, b = WEIGHT_MEANING[kind]
                raise FacetoolError(f"--{k} weighs no term of {kind} (--gamma weighs CE, --alpha {a}, --beta {b}); "
                                    f"leave --{k} out")
            w[k] = float(v)
    return w
