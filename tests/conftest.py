import warnings

import pytest
import torch

# One intra-op thread: the suite's models are tiny, where a second thread costs more in
# synchronisation than it gains (and much more on a busy machine).
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def quiet_trainer(**kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
