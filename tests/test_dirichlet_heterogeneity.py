"""Dirichlet clients differ in label proportions as alpha predicts: every client draws its own
p_i ~ Dir(alpha 1_C). The reference is a Monte-Carlo of the model itself (independent
Dirichlet vectors, multinomial shards), compared on the first clients, whose draws barely
deplete the classes (10 of 40 clients: a quarter of the data)."""
import numpy as np
import pytest

from fslsage_jax.data import partition

C, PER_CLASS, M, FIRST = 10, 4000, 40, 10
LABELS = np.repeat(np.arange(C), PER_CLASS)
PER = len(LABELS) // M


def mean_pairwise_tv(shares: np.ndarray) -> float:
    """Mean total-variation distance between the label distributions of every pair of rows."""
    i, j = np.triu_indices(len(shares), 1)
    return float(0.5 * np.abs(shares[i] - shares[j]).sum(1).mean())


def model_tv(alpha: float, trials: int = 400, seed: int = 123) -> float:
    """E[mean pairwise TV] when FIRST clients each draw p ~ Dir(alpha) and PER labels from it."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(C, alpha), size=(trials, FIRST))
    shares = rng.multinomial(PER, p) / PER
    return float(np.mean([mean_pairwise_tv(s) for s in shares]))


def partition_tv(alpha: float, seeds=range(5)) -> float:
    out = []
    for seed in seeds:
        parts = partition(LABELS, M, "dirichlet", alpha=alpha, num_classes=C, seed=seed)
        shares = np.array([np.bincount(LABELS[p], minlength=C) / len(p) for p in parts[:FIRST]])
        out.append(mean_pairwise_tv(shares))
    return float(np.mean(out))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_clients_label_proportions_differ_as_alpha_predicts(alpha):
    # model: 0.83 (alpha 0.1), 0.47 (1), 0.075 (100); one shared p for all clients would give
    # about 0.05-0.4 at alpha 0.1 and 0.05 at alpha 1
    want, got = model_tv(alpha), partition_tv(alpha)
    assert abs(got - want) < 0.12 * want + 0.01, (got, want)


def test_smaller_alpha_gives_more_different_clients():
    tv = [partition_tv(a, seeds=[0]) for a in (0.1, 1.0, 100.0)]
    assert tv[0] > tv[1] > tv[2] and tv[0] > 0.6 and tv[2] < 0.15
