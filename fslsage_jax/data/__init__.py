"""Data sources, client partitions and on-device image transforms."""
from fslsage_jax.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    make_image_transform,
    normalize,
    random_crop_flip,
)
from fslsage_jax.data.cifar import DataUnavailable, load_cifar10, load_cifar100
from fslsage_jax.data.partition import (
    DISTRIBUTIONS,
    ClientData,
    class_histogram,
    partition,
    partition_dirichlet,
    partition_iid,
    to_client_arrays,
)
from fslsage_jax.data.sources import (
    DATASET_SHAPES,
    DATASETS,
    READS_DATA_DIR,
    Dataset,
    dataset_shape,
    load_dataset,
    load_digits,
    make_synthetic,
)

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "DATASETS", "DATASET_SHAPES", "DISTRIBUTIONS", "READS_DATA_DIR", "ClientData", "DataUnavailable",
           "Dataset", "class_histogram", "dataset_shape", "load_cifar10", "load_cifar100", "load_dataset", "load_digits",
           "make_image_transform", "make_synthetic", "normalize", "partition", "partition_dirichlet",
           "partition_iid", "random_crop_flip", "to_client_arrays"]
