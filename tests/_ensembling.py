"""The ``Ensembling`` callback set up on a module outside a Trainer, for tests that call ``training_step`` by hand."""

from __future__ import annotations

import lightning as L

from lightning_ensembles.callbacks import Ensembling


def ensembled_for_training(module: L.LightningModule, num_members: int) -> Ensembling:
    """Apply ``Ensembling(num_members=...)`` to ``module``, patch its ``training_step`` as ``fit`` does and put it in
    training mode. Returns the callback."""
    cb = Ensembling(num_members=num_members)
    cb.apply(module)
    cb._patch_training_step(module)
    module.train()
    return cb
