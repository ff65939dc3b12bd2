"""Training methods: one module per method, each a :class:`facetool.engine.Method` plugin.

``aig``  ConvNet-AIG gates, target schedule and loss; ``iig``  ConvNet-IIG attribute masks and loss.
The plain cross-entropy classifier is :class:`facetool.engine.ClassificationMethod`.
"""
