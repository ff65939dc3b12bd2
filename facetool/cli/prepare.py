"""`facetool prepare ...`: build face stores. Each source module registers its own subcommand."""

from facetool.cli.hub import make_group

MODULES = ["facetool.cli.prepare_synthetic", "facetool.cli.prepare_datasets", "facetool.cli.prepare_celeba"]
# FAN-Face landmarks (issue 19)
MODULES += ["facetool.cli.prepare_landmarks"]
# scale-out: RecordIO packs
MODULES += ["facetool.cli.prepare_rec"]


def register(app):
    make_group("prepare", "Prepare a face store (HDF5) from a dataset or the synthetic generator.", MODULES, app)
