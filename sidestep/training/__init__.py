"""Adapter training: TrainConfig -> `sidestep.training.run.train()` -> an ACE-Step adapter folder.

Kept light (no torch import) so the CLI can read TrainConfig's defaults without loading torch.
"""

from sidestep.training.config import AdapterKind, InitMode, OptimizerKind, SchedulerKind, TrainConfig

__all__ = ["AdapterKind", "InitMode", "OptimizerKind", "SchedulerKind", "TrainConfig"]
