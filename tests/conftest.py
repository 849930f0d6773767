import warnings

import pytest
import torch
from _trainer import quiet_trainer  # noqa: F401  (the tests import it from here)

# One intra-op thread: the suite's models are tiny, where a second thread costs more in
# synchronisation than it gains (and much more on a busy machine).
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
