"""Model inversion (DeepInversion): synthesise the faces a recognition model "sees" for given
embeddings, by optimising pixels under an identity loss plus composable priors.

Loss, for a batch of images x (normalised to [-1, 1], shape (B, 3, S, S)) and targets t::

    L = w_id·ID(f(J(x)), t) + w_bn·BN(x) + w_tv_l2·TV2(x) + w_tv_l1·TV1(x) + w_l2·L2(x) + Σ model priors

* ``J`` is a random jitter: a roll by (dy, dx) uniform in [-j, j] with j = ``jitter``·S/112 pixels
  and a horizontal flip with probability 1/2 (the same for the whole batch).
* ``ID`` (:class:`IdentityLoss`): ``cosine`` = mean_b (1 − cos(f_b, t_b)); ``l2`` = mean_b ‖f_b − t_b‖².
* ``BN`` (:class:`BNStatsPrior`): Σ_l m_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) over every BatchNorm2d
  that ran, with μ_l, σ²_l the batch mean and *biased* variance of the layer's input (per channel),
  μ̂_l, σ̂²_l its running statistics, m_1 = ``first_bn_mult`` for the first layer and 1 otherwise.
* ``TV2``/``TV1`` (:class:`TVPrior`) use the 4 neighbour differences of every pixel: horizontal
  x[i, j+1] − x[i, j], vertical x[i+1, j] − x[i, j], diagonal x[i+1, j+1] − x[i, j] and
  anti-diagonal x[i+1, j] − x[i, j+1]. TV2 = Σ_directions mean_b ‖D x_b‖₂ (Frobenius norm over
  C, H, W of each image); TV1 = Σ_directions mean |D x| (over all elements).
* ``L2`` (:class:`L2Prior`) = mean_b ‖x_b‖₂.

Image priors act on the un-jittered images; per-image terms are averaged over the batch, so the
weights do not depend on the batch size (the DeepInversion code takes norms over the whole batch,
which makes its TV/l2 weights batch dependent: at batch 192 its TV-l2 is ≈ √192 ≈ 14× ours).

Optimisation: Adam (lr ``lr``) with cosine decay to 0 over each stage, pixels clipped to [-1, 1]
after each step. ``multires`` optimises the first ``warm_fraction`` of the iterations at half
resolution (bilinearly upsampled to S before the model), then upsamples the pixels and continues at
full resolution with a fresh optimiser. The model always sees S×S images.

The thesis ran 20,000 iterations at batch 192 on a GPU; the default here (``iterations=300``) is a
CPU budget: a batch of 8 at 112 px through an IR-ResNet-18 takes a few minutes on 2 cores.

The package is split along its seams: :mod:`.priors` (the loss terms and hooking them onto a model),
:mod:`.optimise` (configuration, the optimisation loop, resumable batches), :mod:`.inputs` (reading
faces or embeddings to invert), :mod:`.metrics` (SSIM, cosines, pair verification) and :mod:`.grid`
(the comparison image). Every public name is importable from ``facetool.explainers.invert``.
"""

from facetool.explainers.invert.grid import grid_image
from facetool.explainers.invert.inputs import IMAGE_SUFFIXES, InversionInputs, load_inputs
from facetool.explainers.invert.metrics import (best_threshold_accuracy, check_evaluation, embed_at,
                                                evaluate_inversion, inverted_pairs, pair_accuracy, real_pair_images,
                                                ssim, verification_pairs)
from facetool.explainers.invert.optimise import (InversionConfig, InversionDiverged, InversionResult, ProgressFn,
                                                 build_priors, embed, invert, invert_batches)
from facetool.explainers.invert.priors import (BasePrior, BNStatsPrior, GatePatternPrior, IdentityLoss, L2Prior, Prior,
                                               RoutingPrior, TVPrior, attached, neighbour_differences,
                                               reference_internals, require_internal)

__all__ = [
    "BNStatsPrior",
    "BasePrior",
    "GatePatternPrior",
    "IMAGE_SUFFIXES",
    "IdentityLoss",
    "InversionConfig",
    "InversionDiverged",
    "InversionInputs",
    "InversionResult",
    "L2Prior",
    "Prior",
    "ProgressFn",
    "RoutingPrior",
    "TVPrior",
    "attached",
    "best_threshold_accuracy",
    "build_priors",
    "check_evaluation",
    "embed",
    "embed_at",
    "evaluate_inversion",
    "grid_image",
    "invert",
    "invert_batches",
    "inverted_pairs",
    "load_inputs",
    "neighbour_differences",
    "pair_accuracy",
    "real_pair_images",
    "reference_internals",
    "require_internal",
    "ssim",
    "verification_pairs",
]
