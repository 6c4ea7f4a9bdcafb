"""logitcache: run the teacher once, store its soft targets in Zarr, make knowledge distillation nearly free."""

from logitcache.version import __version__  # noqa: F401  (the package version, re-exported)

from logitcache.teacher.build import build, build_cache
from logitcache.config import BuildConfig
from logitcache.encoding import to_probs
from logitcache.errors import LogitcacheError
from logitcache.augment.seeds import replay, replay_view, sample_seed
from logitcache.store import Cache, open_cache

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

from logitcache.read.dataset import CachedKDDataset, ReplayDataset
from logitcache.student.losses import KDLoss, kd_loss, kd_loss_dense
from logitcache.student.batchmix import BatchMix, BatchMixing, MixedKDLoss, check_mixing, mixed_kd_loss, mixed_probs
from logitcache.augment.mix import Mix
from logitcache.student.loop import RunResult, TrainConfig, train

__all__ += [
    "CachedKDDataset", "ReplayDataset", "KDLoss", "kd_loss", "kd_loss_dense", "TrainConfig", "RunResult", "train",
    "BatchMix", "BatchMixing", "MixedKDLoss", "check_mixing", "mixed_kd_loss", "mixed_probs", "Mix",
]  # fmt: skip
