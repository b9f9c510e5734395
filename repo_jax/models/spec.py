"""Parameter specifications: shape, logical axis names, initialiser and the HF tensor behind it."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of a layer (shape without the ``layers`` axis) or of the model top.

    Attributes:
      shape: our layout, einsum-friendly (``wq``: ``[D, N, H]``).
      names: logical axis names (``repo_jax.sharding`` maps them to mesh axes).
      init: ``normal`` (std 0.02), ``ones`` or ``zeros``.
      hf_name: the HF tensor name (per layer: after ``model.layers.{i}.``).
      hf_in_dims: how many leading dims of ``shape`` form the ``in`` axis of an HF ``nn.Linear``
        weight ``[out, in]`` (ours = ``hf.T.reshape(shape)``); 0 for an HF vector that we split
        (``[N*H]`` -> ``[N, H]``); ``None`` for the same layout (embeddings, norms).
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    init: Literal["normal", "ones", "zeros"]
    hf_name: str
    hf_in_dims: int | None = None

    def hf_shape(self) -> tuple[int, ...]:
        if self.hf_in_dims is None:
            return self.shape
        if self.hf_in_dims == 0:
            return (math.prod(self.shape),)
        return (math.prod(self.shape[self.hf_in_dims :]), math.prod(self.shape[: self.hf_in_dims]))

    def from_hf(self, w):
        """HF tensor (numpy) -> our layout."""
        if self.hf_in_dims is None or self.hf_in_dims == 0:
            return w.reshape(self.shape)
        return w.T.reshape(self.shape)

    def to_hf(self, w):
        """Our layout (numpy) -> the HF tensor."""
        if self.hf_in_dims is None or self.hf_in_dims == 0:
            return w.reshape(self.hf_shape())
        return w.reshape(math.prod(self.shape[: self.hf_in_dims]), -1).T
