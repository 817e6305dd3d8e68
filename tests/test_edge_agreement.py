"""Edge agreement (metrics.edge_agreement) on maps whose precision and recall are known."""
import numpy as np
import torch

from metrics.edge_agreement import edge_counts, edge_f1, edge_maps


def _vertical_line(column: int, rows: slice = slice(8, 24)) -> np.ndarray:
    edges = np.zeros((32, 32), bool)
    edges[rows, column] = True
    return edges


def test_matches_within_the_tolerance_only():
    target = _vertical_line(10)
    assert edge_f1(edge_counts(target, target)) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(edge_counts(_vertical_line(12), target, tolerance=2))["f1"] == 1.0
    assert edge_f1(edge_counts(_vertical_line(15), target, tolerance=2))["f1"] == 0.0


def test_half_the_condition_drawn_gives_recall_one_half():
    target = _vertical_line(10)
    half = _vertical_line(10, slice(8, 16))
    scores = edge_f1(edge_counts(half, target, tolerance=0))
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5
    assert abs(scores["f1"] - 2 / 3) < 1e-12
    pooled = edge_counts(half, target, tolerance=0) + edge_counts(target, target, tolerance=0)
    assert edge_f1(pooled)["recall"] == 24 / 32  # counts are pooled before the ratio


def test_edge_maps_of_images_find_a_square_outline():
    image = -torch.ones(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    (edges,) = edge_maps(image)
    assert edges.dtype == bool and edges[8:24, 8:24].sum() > 0
    assert not edges[:4].any() and not edges[14:18, 14:18].any()  # nothing in flat regions
