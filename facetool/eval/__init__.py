"""Evaluation: closed-set classification tables (:mod:`facetool.eval.classification`) and the
face-recognition protocols (IJB-B/C, LFW-family verification)."""
