"""Named hyperparameter sets for the paper's experiments.

A preset maps ``experiments/run.py`` option names (argparse ``dest``) to
values; the CLI applies them as defaults, so any flag given explicitly wins.
Values are the ones the FSL-SAGE paper states (Nair et al., ICML
2025) and the authors' code; where the paper is silent the choice is marked.
"""
from __future__ import annotations

_IMAGE = {
    # Section 5 / appendix of the paper: Adam 1e-3, weight decay 1e-4, batch 256,
    # 1 local epoch, Q = 5, l = 10, alignment 100 epochs x batch 1000 on a
    # 1000-sample buffer, stop at 200 GiB or 200 rounds. 10 clients: the code's
    # default for these figures (its run folders also show 3 clients, batch 128).
    "model": "resnet18", "num_clients": 10, "batch_size": 256, "local_epochs": 1,
    "lr": 1e-3, "weight_decay": 1e-4, "optimizer": "adam", "adam_eps": 1e-8, "warmup_steps": 0,
    "server_update_interval": 5, "align_interval": 10, "align_epochs": 100,
    "align_batch_size": 1000, "align_buffer_size": 1000, "rounds": 200,
    "comm_budget_gib": 200.0, "distribution": "iid",
}

_GPT2 = {
    # the paper: AdamW 2e-4, weight decay 0.01, eps 1e-6, 500 warm-up steps, batch 8,
    # sequence 512, alignment 40 epochs x batch 8 on a 64-sample buffer; Q and
    # l as for images; 3 clients (the authors' default); rounds: our choice.
    "dataset": "e2e", "model": "gpt2", "num_clients": 3, "batch_size": 8, "local_epochs": 1,
    "optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.01, "adam_eps": 1e-6,
    "warmup_steps": 500, "seq_len": 512, "server_update_interval": 5, "align_interval": 10,
    "align_epochs": 40, "align_batch_size": 8, "align_buffer_size": 64, "distribution": "iid",
}

PRESETS: dict[str, dict] = {
    "cifar10_resnet18": {**_IMAGE, "dataset": "cifar10", "target_accuracy": 0.81},
    # target accuracy for CIFAR-100: our choice (the paper's headline numbers are CIFAR-10)
    "cifar100_resnet18": {**_IMAGE, "dataset": "cifar100", "target_accuracy": 0.5},
    "e2e_gpt2_medium": {**_GPT2, "gpt2_size": "medium", "rounds": 5},
    # a few small blocks and short sequences: a round in seconds on a CPU
    "e2e_gpt2_tiny": {**_GPT2, "gpt2_size": "tiny", "seq_len": 64, "warmup_steps": 10,
                      "lr": 1e-3, "align_epochs": 2, "align_buffer_size": 16, "rounds": 3,
                      "train_subset": 96, "eval_subset": 48},
}


def preset_defaults(name: str) -> dict:
    """The option values of preset ``name`` (a copy).

    Raises:
      KeyError: unknown preset (the message lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dict(PRESETS[name])
