"""logitcache: run the teacher once, store its soft targets in Zarr, make knowledge distillation nearly free."""

from .version import __version__  # noqa: F401  (the package version, re-exported)

from .build import build, build_cache
from .config import BuildConfig
from .encoding import to_probs
from .errors import LogitcacheError
from .replay import replay, replay_view, sample_seed
from .store import Cache, open_cache

__all__ = [
    "build",
    "build_cache",
    "BuildConfig",
    "open_cache",
    "Cache",
    "to_probs",
    "replay",
    "replay_view",
    "sample_seed",
    "LogitcacheError",
]

from .data import CachedKDDataset, ReplayDataset
from .losses import KDLoss, kd_loss, kd_loss_dense
from .batchmix import BatchMix, BatchMixing, MixedKDLoss, check_mixing, mixed_kd_loss, mixed_probs
from .mix import Mix
from .train import RunResult, TrainConfig, train

__all__ += [
    "CachedKDDataset", "ReplayDataset", "KDLoss", "kd_loss", "kd_loss_dense", "TrainConfig", "RunResult", "train",
    "BatchMix", "BatchMixing", "MixedKDLoss", "check_mixing", "mixed_kd_loss", "mixed_probs", "Mix",
]  # fmt: skip
