"""Data: the PyTorch dataset over a face store, transforms and dataset loaders."""

from facetool.data.dataset import FaceDataset, make_loader
from facetool.data.transforms import denormalize, normalize

__all__ = ["FaceDataset", "make_loader", "normalize", "denormalize"]
