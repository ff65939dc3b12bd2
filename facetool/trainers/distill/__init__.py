"""Knowledge distillation on the training engine: SRRL (:mod:`facetool.trainers.srrl`) and the baselines
it is measured against (KD, FitNet, AT, RKD, PKT), one job per module:

``losses``       the loss functions and per-method weights (RepDistiller's conventions; SRRL the thesis')
``teacher``      the frozen teacher and its classifier, read through removable hooks
``method``       :class:`DistillMethod`, the engine plug-in for every kind
``data``         unlabeled images, first-N-per-identity subsets
``diagnostics``  the thesis' diagnostics table (top-1/5, KL, feature distance, NMI, linear probe)
``run``          :func:`distill`, what ``facetool distill`` calls

The total loss is

    gamma * L_CE  +  alpha * L_KL(T)  +  beta * L_other          (RepDistiller: -r, -a, -b)
    gamma * L_CE  +  alpha * L_FM     +  beta * L_SR             (SRRL, Eqs. 4.3/4.7/4.8)
    ... + lambda * L_KD(unlabeled or mixed images)               (thesis section 4.2.2)

with the per-method defaults of :data:`DEFAULT_WEIGHTS` (KD: 0.1 / 0.9 / 0 at T = 4; FitNet beta 100;
AT 1000; RKD 1 with distance 25 + angle 50 inside; PKT 30000; SRRL 1 / 1 / 1).

The teacher is frozen: eval mode, ``requires_grad=False``, never in the optimizer, its targets computed
under ``torch.inference_mode``. Only SRRL runs the *student's* connected feature through the teacher's
head with autograd on, so gradients reach the student through W_T while W_T stays fixed.
"""

from facetool.trainers.distill.data import FolderImages, WithUnlabeled, first_per_identity, open_unlabeled
from facetool.trainers.distill.diagnostics import diagnostics, linear_probe, nmi
from facetool.trainers.distill.losses import (DEFAULT_WEIGHTS, METHODS, NEEDS_FEATURES, at_loss, attention_map,
                                              hint_loss, kd_loss, mixup_images, pairwise_distances, pkt_loss, pooled,
                                              resolve_weights, rkd_loss, soft_kd_loss)
from facetool.trainers.distill.method import DistillMethod
from facetool.trainers.distill.run import distill, resolve_student
from facetool.hooks import taps  # re-exported: the distillation API has always offered it
from facetool.trainers.distill.teacher import Teacher, load_head, load_teacher

__all__ = ["DEFAULT_WEIGHTS", "METHODS", "NEEDS_FEATURES", "DistillMethod", "FolderImages", "Teacher", "WithUnlabeled",
           "at_loss", "attention_map", "diagnostics", "distill", "first_per_identity", "hint_loss", "kd_loss",
           "linear_probe", "load_head", "load_teacher", "mixup_images", "nmi", "open_unlabeled", "pairwise_distances",
           "pkt_loss", "pooled", "resolve_student", "resolve_weights", "rkd_loss", "soft_kd_loss", "taps"]
