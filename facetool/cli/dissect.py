"""`facetool dissect ...`: look inside trained models."""

from facetool.cli.hub import make_group

MODULES = ["facetool.cli.dissect_gates", "facetool.cli.dissect_attention", "facetool.cli.dissect_relevance"]


def register(app):
    make_group("dissect", "Dissect trained models: gate usage per attribute, easy/hard images, attention maps.", MODULES, app)
