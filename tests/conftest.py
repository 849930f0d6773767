import os
import warnings

import pytest
import torch

# Keep runs reproducible and quiet; the machine has 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def quiet_trainer(**kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
