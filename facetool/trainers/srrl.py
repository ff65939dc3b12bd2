"""Softmax Regression Representation Learning (SRRL; thesis ch. 4, Eqs. 4.3, 4.4, 4.7, 4.8).

The student's last feature map goes through a *connector* (1x1 conv student -> teacher channels,
BN, ReLU) so that any student pairs with any teacher; the connected map is then

* pooled and compared with the teacher's pooled penultimate feature:  L_FM = mean over the D feature
  dimensions (and the batch) of (h_T - h_S)^2 = ||h_T - h_S||^2 / D: the thesis' and the reference
  code's MSE of the pooled features (the diagnostics table reports the same quantity), and
* passed through the teacher's *frozen* classifier W_T:  L_SR = ||W_T h_T - W_T h_S||^2
  (``sr_loss="l2"``, mean squared error of the logits, no temperature), or the cross-entropy of the
  teacher's softmax against the student's (``sr_loss="ce"``, Eq. 4.4, the Table 4.4 ablation).

Gradients of L_SR flow through W_T into the connector and the student; W_T itself is never updated
(its parameters have ``requires_grad=False`` and are not in the optimizer). The full loss is
``L = L_CE + alpha * L_FM + beta * L_SR`` with alpha = beta = 1 (:mod:`facetool.trainers.distill`
assembles it). The connector's ReLU is kept when the teacher's feature map is non-negative (ResNets,
whose stages end in a ReLU, as in the reference code) and dropped otherwise (IR-ResNet and
MobileFaceNet maps are signed; a ReLU there would make them unreachable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SR_LOSSES = ("l2", "ce")


class Connector(nn.Module):
    """1x1 conv (no bias) -> BN -> ReLU from ``cin`` student channels to ``cout`` teacher channels;
    the output is resized to the teacher's spatial size ``size`` when the two maps differ."""

    def __init__(self, cin: int, cout: int, relu: bool = True, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu
        self.size = tuple(size) if size is not None else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, f: Tensor) -> Tensor:
        y = self.bn(self.conv(f))
        if self.relu:
            y = torch.relu(y)
        return match_size(y, self.size)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, size={self.size}"


def match_size(f: Tensor, size: tuple[int, int] | None) -> Tensor:
    """Bring a (B, C, h, w) map to ``size``: average-pool a larger one, bilinearly enlarge a smaller one."""
    if size is None or tuple(f.shape[-2:]) == tuple(size):
        return f
    if f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def fm_loss(h_s: Tensor, h_t: Tensor) -> Tensor:
    """L_FM (Eq. 4.7): mean over batch and dimensions of (h_T - h_S)^2 (= ||h_T - h_S||^2 / D per image);
    the teacher side is a target. The one definition: the distillation diagnostics report this too."""
    return F.mse_loss(h_s.float(), h_t.detach().float())


def sr_loss(logits_s: Tensor, logits_t: Tensor, kind: str = "l2") -> Tensor:
    """L_SR of the connected student feature through the teacher classifier.

    ``l2`` (Eq. 4.8): mean squared difference of the logits W_T h_S and W_T h_T.
    ``ce`` (Eq. 4.4): cross-entropy -sum p_T log p_S of the two softmaxes, averaged over the batch.
    """
    s, t = logits_s.float(), logits_t.detach().float()
    if kind == "l2":
        return F.mse_loss(s, t)
    if kind == "ce":
        return -(F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1).mean()
    raise ValueError(f"unknown SR loss {kind!r}; use one of {', '.join(SR_LOSSES)}")


__all__ = ["Connector", "match_size", "fm_loss", "sr_loss", "SR_LOSSES"]
