"""`facetool eval ...`: classification on a store, and the recognition protocols."""

from facetool.cli.hub import make_group

MODULES = ["facetool.cli.eval_classify", "facetool.cli.eval_recognition",
           "facetool.cli.eval_landmarks"]


def register(app):
    make_group("eval", "Evaluate models: classification tables, IJB-B/C, LFW-family verification.", MODULES, app)
