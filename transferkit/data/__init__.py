"""Datasets: discovery of image folders/CSVs, robust decoding, torch datasets and checks."""

from transferkit.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from transferkit.data.discover import DatasetIndex, Sample, discover

__all__ = ["IMAGE_EXTENSIONS", "DatasetIndex", "ImageDecodeError", "Sample", "discover", "load_image"]
