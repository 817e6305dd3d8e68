"""Image-caption datasets behind one config: folder, webdataset, emoji, shapes, fashion-mnist."""
from data.build import build_dataset
from data.config import DataConfig, validate_config
from data.keyed import KeyedImageDataset, RawSample

__all__ = ["DataConfig", "build_dataset", "validate_config", "KeyedImageDataset", "RawSample"]
