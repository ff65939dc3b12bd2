"""`facetool dissect ...`: look inside trained models."""

from facetool.cli.hub import make_group

MODULES = ["facetool.cli.dissect_gates", "facetool.cli.dissect_attention", "facetool.cli.dissect_relevance",
           "facetool.cli.dissect_units",
           # CondFace routing clusters (thesis Table 5.1)
           "facetool.cli.dissect_routing",
           "facetool.cli.dissect_counterfactual"]  # EXPLAIN-CF (issue 21)


def register(app):
    make_group("dissect", "Dissect trained models: gate usage per attribute, easy/hard images, attention maps, "
               "relevance maps, units paired with face concepts (HND), routing clusters (CondFace).", MODULES, app)
