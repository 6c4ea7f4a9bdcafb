"""Replayable augmentation: seeds as a pure function of (seed, view, index) (``seeds``), per-sample Mixup and
CutMix (``mix``), the built-in presets (``presets``), and the replay fingerprint that proves a pipeline replays
(``fingerprint``)."""
