"""Layer-wise relevance propagation (LRP) for every facetool architecture, with zennit's rules computed in
one forward and one backward (:mod:`facetool.explainers.lrp.onepass`; zennit's hooks are the reference).

zennit applies its rules to *modules*; its own canonizers only know torchvision's ResNet blocks and
merge a BatchNorm only when it directly follows a linear layer. The canonizers here bring each
architecture into the canonical form LRP needs, temporarily (attached and detached as a context
manager; the model's outputs are bit-identical afterwards): BatchNorms merged into the adjacent
conv/linear (parameters restored on exit), residual sums ``shortcut + branch`` as a ``zennit.layer.Sum``
module over the stacked terms (so the proportional rule splits relevance between the terms instead of
the gradient copying it to both), and whatever else a family needs.

One module per model family, each registering its canonizers for its model class
(:func:`register_canonizer`; looked up along the model's MRO, so subclasses inherit them):

``resnet``         facetool ResNet and ConvNet-AIG (gates held at the executed decisions), torchvision ResNet
``iresnet``        IR-ResNet (pre-BN blocks: right-merges into temporary convs/linears, border correction)
``mobilefacenet``  MobileFaceNet
``condface``       CondFace (routing held; each image's aggregated kernel as one grouped conv over the batch)
``parts``          the building blocks (pair merges, attribute canonizers, ``Sum``, BN as an affine map)
``registry``       the registry, :func:`check_canonizable`, :func:`canonizers_for`
``rules``          the composites and :func:`lrp`
``onepass``        the rules as layer forwards whose products are the rules' redistributions (no hooks)

A new architecture is one new module here (or in the user's code) with one registration. A model (or
a sub-module type) no registration handles is refused with an error naming the type
(:func:`check_canonizable`), never silently explained by plain gradients.

Composites (``method``): ``lrp`` = EpsilonPlusFlat, ``lrp-gamma`` = EpsilonGammaBox with the bounds
of facetool's normalisation ((0 - 127.5) / 127.5 = -1 .. 1), ``lrp-ab`` = EpsilonAlpha2Beta1,
``lrp-epsilon`` = the epsilon rule on every linear layer (used by the conservation tests).
``bias_free=True`` zeroes the biases in the rules (zennit's ``zero_params='bias'``): then each layer
conserves relevance and the input relevance sums to the explained output (zennit issue #183).
"""

from facetool.explainers.lrp.parts import LEAVES
from facetool.explainers.lrp.registry import (CANONIZERS, Canonization, canonization_of, canonizers_for,
                                              check_canonizable, register_canonizer)
from facetool.explainers.lrp.rules import LRP_METHODS, input_bounds, lrp, lrp_context, make_composite
from facetool.hooks import eval_mode

__all__ = ["CANONIZERS", "Canonization", "LEAVES", "LRP_METHODS", "canonization_of", "canonizers_for",
           "check_canonizable", "eval_mode", "input_bounds", "lrp", "lrp_context", "make_composite",
           "register_canonizer"]
