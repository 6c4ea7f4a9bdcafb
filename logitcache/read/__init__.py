"""Cached targets on their way to the loss: ``CachedKDDataset`` (``dataset``) and its read paths, whole views
in shared memory (``views``), a ring of chunk windows (``ring``) fed in the chunk-shuffle order (``sampler``), and
the process bookkeeping they share (``procs``)."""
