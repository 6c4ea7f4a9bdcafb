"""The student's side: the training loop (``loop``: a step that reads top to bottom), the KD losses on
cached or live targets (``losses``), batch-level Mixup/CutMix with cached targets (``batchmix``), checkpoints
(``checkpoint``) and time-to-accuracy budgets (``budgets``)."""
