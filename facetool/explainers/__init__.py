"""Explainers: what a trained face model does and why. Each attaches to a model through the one model
interface (``forward_features`` / ``forward_head``, named internals, named modules) as a context manager
and never modifies it (``CONTRACTS.md``, sections "Models" and "Explainers").

``lrp``         LRP canonizers and rules (zennit) for every facetool architecture
``relevance``   relevance maps of any explainer and their validation (``dissect relevance|generalisation``)
``attention``   ABN attention maps per part and attribute value (``dissect attention``)
``dissect``     ConvNet-AIG / IIG gate dissection (``dissect gates``)
``units``       Hierarchical Network Dissection of units and bias discovery (``dissect units``)
``invert``      face inversion from embeddings or logits (``invert``)
"""
