"""`facetool train ...`: every trainer runs on the one engine (facetool.engine)."""

from facetool.cli.hub import make_group

MODULES = ["facetool.cli.train_classify", "facetool.cli.train_arcface", "facetool.cli.train_condface",
           "facetool.cli.train_fan",
           "facetool.cli.train_fanface"]


def register(app):
    make_group("train", "Train a model on a face store (one engine: resume, AMP, DDP under torchrun).", MODULES, app)
