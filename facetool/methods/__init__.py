"""Training methods: one module per method, each a :class:`facetool.engine.Method` plugin.

``aig``  ConvNet-AIG target schedule and loss (the gated block itself: :mod:`facetool.models.gated`); ``iig``  ConvNet-IIG attribute masks and loss.
The plain cross-entropy classifier is :class:`facetool.engine.ClassificationMethod`.
"""
