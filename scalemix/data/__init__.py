"""Data: in-memory image sets, downloads, and batched on-device augmentation."""

from scalemix.choices import AUGMENTATIONS
from scalemix.data.augment import augment
from scalemix.data.datasets import DATASETS, ImageData, load_data, load_public_images, normalize

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "ImageData",
    "augment",
    "load_data",
    "load_public_images",
    "normalize",
]
