"""Training frameworks and data sources around ``CachedKDDataset``, each in its own module so that importing
logitcache needs none of them:

- ``logitcache.integrations.lightning``: ``CachedKDDataModule`` for Lightning (``pip install 'logitcache[lightning]'``).
- ``logitcache.integrations.accelerate``: ``kd_dataloader`` for Hugging Face Accelerate
  (``pip install 'logitcache[accelerate]'``).
- ``logitcache.integrations.hf``: ``HFImages``, a Hugging Face ``datasets.Dataset`` as the base dataset
  (``pip install 'logitcache[hf]'``).
"""
