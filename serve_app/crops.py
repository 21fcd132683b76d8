"""The preprocessor's output, in a module of its own: the ingress builds one for images that
arrive already preprocessed (/v2 ``pixels``) and must not import torch to do so."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Crops:
    """A group of images after preprocessing: the crops that worked, stacked in input order,
    and per input either None (its crop is next in ``pixels``) or why it failed.

    numpy, not torch: Ray hands a large array to the next replica from its object store without
    copying it, and pickles it an order of magnitude faster than a tensor.
    """

    pixels: np.ndarray  # (n_ok, 3, crop, crop) uint8; float32 in [0, 1] from /v2 pixels
    errors: list[Exception | None]

    def __len__(self) -> int:
        return len(self.errors)
