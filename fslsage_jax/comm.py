"""The communication ledger: exact bytes per message kind, as the FSL-SAGE
code counts them (float32 = 4 bytes; models = parameters + non-trainable state).

The compiled round counts on the device what it sent (``z_up`` cut activations
uploaded, ``g_down`` cut-layer gradients sent back, ``aux_down`` clients that
received an aligned auxiliary model, ``models`` clients that exchanged their model
with the fed server); each algorithm declares the size of the model it
exchanges (``AlgorithmDef.model_bytes``). Byte sizes come from shapes and
dtypes; all arithmetic here is in exact Python integers.

The per-algorithm rules (docs/semantics.md's table: which messages each algorithm sends and how
large its per-round model is) live with the algorithms (``AlgorithmDef``); this
module knows message kinds, not algorithms.

Labels travel with every ``z``; the original code does not count them, so they
have their own counter (``labels_up``, int32) outside the paper-comparable total.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from fslsage_jax.split import SplitModel, cut_shape, describe

KINDS = ("smashed_up", "grad_down", "model_up", "model_down", "aux_down", "labels_up")
PAPER_KINDS = KINDS[:5]
GIB = 2 ** 30


class Sizes(NamedTuple):
    """Byte sizes used by the ledger (all exact integers)."""
    client: int
    server: int
    aux: int
    z_per_sample: int
    label_per_sample: int

    @property
    def full(self) -> int:
        return self.client + self.server


def sizes_of(split: SplitModel) -> Sizes:
    """Byte sizes of ``split``'s parts, one cut activation and one label."""
    d = describe(split)
    z_shape, _ = cut_shape(split)
    label_bytes = int(np.prod(split.label_shape, dtype=np.int64)) * 4   # int32
    mb = d["model_bytes"]
    return Sizes(mb["client"], mb["server"], mb["aux"], d["cut_bytes_per_sample"], label_bytes)


def round_bytes(model_bytes: int, sizes: Sizes, counts: Mapping[str, int]) -> dict:
    """Bytes of one round per message kind, from what the compiled round counted.

    Args:
      model_bytes: bytes of the model one client sends up (and receives down) per round
        (``AlgorithmDef.model_bytes(sizes)``).
      sizes: from :func:`sizes_of`.
      counts: the round's ``z_up``, ``g_down`` (samples), ``aux_down`` (clients sent an
        aligned auxiliary model), ``models`` (clients that exchanged their model with the
        fed server) and ``aux_models`` (clients that exchanged their auxiliary model).
    Returns:
      ``{kind: bytes}`` for every kind in :data:`KINDS`.
    """
    z_up = int(counts["z_up"])
    exchanged = int(counts["models"]) * model_bytes + int(counts["aux_models"]) * sizes.aux
    return {"smashed_up": z_up * sizes.z_per_sample,
            "grad_down": int(counts["g_down"]) * sizes.z_per_sample,
            "model_up": exchanged, "model_down": exchanged,
            "aux_down": int(counts["aux_down"]) * sizes.aux,
            "labels_up": z_up * sizes.label_per_sample}


class Ledger(NamedTuple):
    """Cumulative bytes per message kind (immutable; :func:`add` returns a new one)."""
    counts: Mapping[str, int]

    @staticmethod
    def empty() -> "Ledger":
        return Ledger({k: 0 for k in KINDS})

    def add(self, delta: Mapping[str, int]) -> "Ledger":
        """The ledger after adding one round's bytes."""
        return Ledger({k: self.counts[k] + int(delta.get(k, 0)) for k in KINDS})

    @property
    def total(self) -> int:
        """Paper-comparable total in bytes (every kind but ``labels_up``)."""
        return sum(self.counts[k] for k in PAPER_KINDS)

    @property
    def total_gib(self) -> float:
        return self.total / GIB
