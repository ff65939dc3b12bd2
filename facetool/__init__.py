"""facetool: a research bench for interpretable, efficient face recognition.

The package is a library first; ``facetool.cli`` is a thin Typer layer over it.
"""

__version__ = "0.1.0"

from facetool.errors import FacetoolError  # noqa: E402

__all__ = ["FacetoolError", "__version__"]
