"""Relevance maps for face models and their validation: one protocol for every explainer.

One job per module: :mod:`.targets` (what is explained), :mod:`.maps` (the explainer dispatch),
:mod:`.metrics` (perturbation curves, part mass, masking), :mod:`.inputs` (images, references),
:mod:`.plots` (figures), :mod:`.run` (``dissect relevance``) and :mod:`.generalisation`
(``dissect generalisation``).

Explainers (``--method``): LRP (``lrp`` EpsilonPlusFlat, ``lrp-gamma`` EpsilonGammaBox, ``lrp-ab``
EpsilonAlpha2Beta1; :mod:`facetool.explainers.lrp`), the Grad-CAM family through ``pytorch-grad-cam``
(``gradcam``, ``gradcam++``, ``scorecam``; the layer is the model's ``cam_layer``), ``attention`` (the
model's own ``internals["attention"]``, e.g. ABN) and ``random`` (a baseline: i.i.d. uniform maps).

What is explained (``--target``): ``label`` (the true identity class), ``predicted`` (the argmax),
``attribute:NAME`` (an attribute model's logit of the image's true value, else its prediction), or
``cosine`` for embedding models: the cosine similarity of the image's embedding to a reference
embedding (``--reference self | same-identity | IMAGE | pairs.txt``). LRP starts from the relevance
``e_k * r_k / (|e| |r|)`` per embedding dimension (its sum is the cosine); Grad-CAM differentiates the
cosine. (With ``self`` the cosine is at its maximum, so its gradient - and every gradient-based CAM -
is zero; LRP still decomposes it.)

Validation:

* :func:`perturbation_curves`: remove pixels or ``patch`` x ``patch`` regions in relevance order
  (MoRF), in reverse (LeRF) and in a random order, in ``steps`` equal steps up to ``max_fraction`` of
  the image, filling with ``mean`` (per-image channel mean), ``blur`` (Gaussian blur) or ``black``;
  score = probability of the explained class, or the cosine; ``AOPC = 1/(K+1) sum_k (s_0 - s_k)``
  (Samek et al. 2017). A good explainer has a high MoRF AOPC and a low LeRF AOPC.
* :func:`part_mass`: share of the positive relevance inside each ground-truth part mask vs the part's
  share of the image area (ratio > 1: the explainer concentrates on the part).
"""

from facetool.explainers.relevance.generalisation import generalisation_matrix
from facetool.explainers.relevance.inputs import image_file, load_images, select_rows
from facetool.explainers.relevance.maps import CAM_METHODS, LRP_METHODS, METHODS, explain, normalise
from facetool.explainers.relevance.metrics import (FILLS, ORDERS, mask_by_map, part_mass, perturbation_curves,
                                                   region_scores, removal_masks, resize_masks)
from facetool.explainers.relevance.run import dissect_relevance
from facetool.explainers.relevance.targets import (CosineTarget, Explained, Target, attribute_slice, check_target,
                                                   embed, resolve)

__all__ = ["CAM_METHODS", "CosineTarget", "Explained", "FILLS", "LRP_METHODS", "METHODS", "ORDERS", "Target",
           "attribute_slice", "check_target", "dissect_relevance", "embed", "explain", "generalisation_matrix",
           "image_file", "load_images", "mask_by_map", "normalise", "part_mass", "perturbation_curves",
           "region_scores", "removal_masks", "resize_masks", "resolve", "select_rows"]
