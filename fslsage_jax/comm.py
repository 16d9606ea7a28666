"""The communication ledger: exact bytes per message kind, as the FSL-SAGE
code counts them (float32 = 4 bytes; models = parameters + non-trainable state).

The compiled round returns how many samples were uploaded as cut activations
(``z_up``) and how many cut-layer gradients came back (``g_down``); byte sizes
come from shapes and dtypes; all arithmetic here is in exact Python integers.

| algorithm         | per local step          | every Q steps | per round                 | every l rounds   |
|-------------------|-------------------------|---------------|---------------------------|------------------|
| fed_avg           | -                       | -             | 2 m bytes(full)           | -                |
| sl_multi_server   | z up + dL/dz down       | -             | 2 m bytes(client)         | -                |
| sl_single_server  | z up + dL/dz down       | -             | 2 m bytes(client)         | -                |
| cse_fsl           | -                       | z up          | 2 m (bytes(client)+aux)   | -                |
| fsl_sage          | -                       | z up          | 2 m bytes(client)         | aux_i down, each |

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


def round_bytes(algo: str, sizes: Sizes, num_clients: int, z_up: int, g_down: int,
                aligned: bool) -> dict:
    """Bytes of one round per message kind.

    Args:
      algo: algorithm name.
      sizes: from :func:`sizes_of`.
      num_clients: m (all clients take part every round).
      z_up: samples whose cut activation went up this round.
      g_down: samples whose cut-layer gradient came down this round.
      aligned: whether FSL-SAGE aligned (and sent) the auxiliary models.
    Returns:
      ``{kind: bytes}`` for every kind in :data:`KINDS`.
    """
    model = {"fed_avg": sizes.full, "sl_multi_server": sizes.client,
             "sl_single_server": sizes.client, "cse_fsl": sizes.client + sizes.aux,
             "fsl_sage": sizes.client}[algo]
    m = num_clients
    return {"smashed_up": int(z_up) * sizes.z_per_sample,
            "grad_down": int(g_down) * sizes.z_per_sample,
            "model_up": m * model, "model_down": m * model,
            "aux_down": m * sizes.aux if (algo == "fsl_sage" and aligned) else 0,
            "labels_up": int(z_up) * sizes.label_per_sample}


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
