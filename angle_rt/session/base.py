"""The interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Session(ABC):
    """Runs the exported graph: (input_ids, attention_mask) → embedding [batch, dim]."""

    #: numpy dtype the graph wants for input_ids / attention_mask
    input_dtype: type = np.int64
    #: pad each batch's width to a multiple of this (8 suits GPU kernels)
    pad_multiple: int = 1
    #: widest batch the backend takes (a TensorRT engine's largest profile); None: any
    max_width: int | None = None
    #: what one more run costs, in padded tokens: the planner splits a batch of mixed
    #: lengths where that saves more padding (0: never split)
    batch_cost: int = 0
    #: a short name for messages and benchmarks, e.g. "onnxruntime-cpu"
    name: str = "session"

    @abstractmethod
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings for one padded batch, float32 [batch, dim]. Thread-safe."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
