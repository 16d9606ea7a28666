"""Data sources and client partitions."""
from fslsage_jax.data.partition import (DISTRIBUTIONS, ClientData, class_histogram, partition,
                                        partition_dirichlet, partition_iid, to_client_arrays)
from fslsage_jax.data.sources import DATASETS, Dataset, load_dataset, load_digits, make_synthetic

__all__ = ["ClientData", "DATASETS", "DISTRIBUTIONS", "Dataset", "class_histogram", "load_dataset",
           "load_digits", "make_synthetic", "partition", "partition_dirichlet", "partition_iid",
           "to_client_arrays"]
