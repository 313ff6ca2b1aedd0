"""Offline data sets with high-dimensional frames, built from data that ships with scikit-learn.

Nothing here downloads: :func:`moving_digits` animates sklearn's 8x8 handwritten digits
(``sklearn.datasets.load_digits``, 1,797 images) across a larger canvas, giving sequence
classification with thousands of inputs per frame -- the regime where a Block-Term
input-to-hidden layer matters (the paper's UCF11 frames have 57,600).
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accel._optional import require


@dataclass(frozen=True)
class SequenceSplit:
    """Sequences ``inputs`` of shape ``(N, T, features)`` (float32) and ``labels`` of shape ``(N,)``.

    ``sources`` (``(N,)``, int64, or None) names the source image of each clip, so that a further split
    (e.g. a validation set) can keep all clips of one image on the same side.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _digits_file() -> Path | None:
    """The file ``sklearn.datasets.load_digits`` reads, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def require_digits() -> None:
    """Raise :class:`accel._optional.MissingDependency` (naming the ``demo`` extra) if the digits cannot be had."""
    if _digits_file() is None:
        require("sklearn.datasets", extra="demo", feature="the demo's data (scikit-learn's digits)")


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(images (1797, 8, 8) float64, labels (1797,) int)``.

    Read from the file that ``sklearn.datasets.load_digits`` reads, the way it reads it, without
    importing scikit-learn (seconds of every start, and of every restart of a training job); the
    arrays are identical (tested). Falls back to ``load_digits`` if the file is not where expected.

    Raises:
        accel._optional.MissingDependency: scikit-learn is not installed (``pip install 'accel-train[demo]'``).
    """
    path = _digits_file()
    if path is not None:
        with gzip.open(path, mode="rt", encoding="utf-8") as text:
            data = np.loadtxt(text, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    datasets = require("sklearn.datasets", extra="demo", feature="the demo's data (scikit-learn's digits)")
    digits = datasets.load_digits()
    return digits.images, digits.target


def _trajectory(rng: np.random.Generator, num_frames: int, span: tuple[int, int]) -> np.ndarray:
    """Integer (row, col) offsets of a sprite bouncing inside ``span`` at a constant speed."""
    position = rng.uniform(0, span)
    velocity = rng.uniform(1.0, 3.0, size=2) * rng.choice([-1.0, 1.0], size=2)
    path = np.empty((num_frames, 2), dtype=np.int64)
    for t in range(num_frames):
        path[t] = np.rint(position)
        position = position + velocity
        for axis in range(2):  # reflect off the walls
            if position[axis] < 0 or position[axis] > span[axis]:
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], 0, span[axis])
    return path


def moving_digits(*, num_frames: int = 8, canvas: tuple[int, int] = (40, 40), scale: int = 2,
                  sequences_per_image: int = 2, noise: float = 0.1, test_fraction: float = 0.2,
                  seed: int = 0) -> tuple[SequenceSplit, SequenceSplit]:
    r"""Handwritten digits moving across a canvas: classify the digit from the clip.

    Each sklearn digit (8x8, scaled up by ``scale``) bounces across a ``canvas`` at a random
    speed for ``num_frames`` frames, with Gaussian pixel noise. Train and test are split by
    source image, so test clips show digits never seen in training.

    Args:
        num_frames (int): frames per clip (default: 8).
        canvas (tuple[int, int]): frame height and width; features per frame = height * width
            (default: (40, 40), i.e. 1,600 inputs per frame).
        scale (int): integer up-scaling of the 8x8 digit (default: 2).
        sequences_per_image (int): clips made from each source image (default: 2).
        noise (float): standard deviation of the pixel noise, pixels in [0, 1] (default: 0.1).
        test_fraction (float): fraction of source images held out for testing (default: 0.2).
        seed (int): the generator's seed; the same seed gives the same data (default: 0).

    Returns:
        ``(train, test)``: two :class:`SequenceSplit` with inputs ``(N, num_frames, H*W)``.
    """
    height, width = canvas
    sprite = 8 * scale
    if num_frames < 1 or scale < 1 or sequences_per_image < 1:
        raise ValueError(f"num_frames, scale and sequences_per_image must be >= 1, got "
                         f"{num_frames}, {scale}, {sequences_per_image}")
    if height < sprite or width < sprite:
        raise ValueError(f"canvas {canvas} is smaller than the {sprite}x{sprite} digit (scale={scale})")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    digit_images, digit_labels = load_digit_images()
    images = np.kron(digit_images / 16.0, np.ones((scale, scale))).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    num_test = int(round(test_fraction * len(images)))

    def build(indices: np.ndarray) -> SequenceSplit:
        clips = np.zeros((len(indices) * sequences_per_image, num_frames, height, width), np.float32)
        sources = np.repeat(indices, sequences_per_image)
        labels = digit_labels[sources]
        for n, index in enumerate(sources):
            path = _trajectory(rng, num_frames, (height - sprite, width - sprite))
            for t, (row, col) in enumerate(path):
                clips[n, t, row:row + sprite, col:col + sprite] = images[index]
        clips += rng.normal(0.0, noise, size=clips.shape).astype(np.float32)
        inputs = torch.from_numpy(clips.reshape(len(clips), num_frames, height * width))
        return SequenceSplit(inputs, torch.from_numpy(labels.astype(np.int64)),
                             torch.from_numpy(sources.astype(np.int64)))

    return build(order[num_test:]), build(order[:num_test])
