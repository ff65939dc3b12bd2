"""`python -m facetool ...` (and `torchrun --nproc_per_node=N -m facetool train ...`)."""

from facetool.cli import main

if __name__ == "__main__":
    main()
