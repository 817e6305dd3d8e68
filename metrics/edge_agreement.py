"""How well generated images follow an edge condition: Canny edges matched within a tolerance.

precision = generated edge pixels near a condition edge; recall = condition edge pixels near a
generated edge; counts are pooled over a set before the ratios, F1 their harmonic mean.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from conditioning.edges import canny, to_uint8_hwc


def edge_maps(images: torch.Tensor, low: int = 100, high: int = 200) -> list[np.ndarray]:
    """Canny edge maps (bool [H, W]) of images [B, 3, H, W] in [-1, 1]."""
    return [canny(to_uint8_hwc(image), low, high) > 0 for image in images]


def edge_counts(edges: np.ndarray, target: np.ndarray, tolerance: int = 2) -> np.ndarray:
    """[matched generated, generated, matched target, target] edge-pixel counts of bool maps [H, W]."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_target = cv2.dilate(target.astype(np.uint8), kernel) > 0
    near_edges = cv2.dilate(edges.astype(np.uint8), kernel) > 0
    return np.array([(edges & near_target).sum(), edges.sum(), (target & near_edges).sum(), target.sum()],
                    dtype=np.int64)


def edge_f1(counts: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 from pooled `edge_counts`."""
    precision = counts[0] / max(counts[1], 1)
    recall = counts[2] / max(counts[3], 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
