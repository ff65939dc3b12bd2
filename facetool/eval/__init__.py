"""Evaluation: closed-set classification tables (:mod:`facetool.eval.classification`), the
face-recognition protocols (IJB-B/C, LFW-family verification) and cluster scores against labels and the
thesis's attribute cohorts (:mod:`facetool.eval.clusters`)."""

#: the packs of insightface's verification sets, by command name (here, not in ``verification``, so the
#: CLI can register one command per set without importing torch)
BIN_SETS = ("lfw", "cfp-fp", "agedb-30", "calfw", "cplfw")
