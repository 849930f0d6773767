"""A 1-D heteroscedastic regression toy with a gap in the training inputs."""

from __future__ import annotations

import torch

from ._tensor_dm import TensorDataModule


def toy_function(x: torch.Tensor) -> torch.Tensor:
    """The noise-free target ``x * sin(x)``."""
    return x * torch.sin(x)


def toy_noise_std(x: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic noise: grows with ``|x|``."""
    return 0.1 + 0.1 * x.abs()


class ToyRegressionDataModule(TensorDataModule):
    """``y = x sin x + eps(x)`` with ``x`` drawn from ``[-5, -2] U [2, 5]``: no training data in the gap (-2, 2).

    Train and validation draw from the two intervals; test is an even grid over ``[-6, 6]``, gap
    included, so plots and tests can see epistemic uncertainty rise in the gap. Inputs ``(N, 1)``,
    targets ``(N, 1)``.

    Args:
        num_train: training samples.
        num_val: validation samples.
        num_test: test grid points.
        batch_size: batch size of every dataloader.
        seed: seed of the data.
        shuffle_seed: seed of the training order (``None``: ``torch.initial_seed()``).

    Example:
        >>> dm = ToyRegressionDataModule(num_train=64, batch_size=16)
        >>> dm.setup()
        >>> x, y = dm.splits["train"].tensors
        >>> bool(((x.abs() >= 2) & (x.abs() <= 5)).all()), tuple(y.shape)
        (True, (64, 1))
    """

    gap = (-2.0, 2.0)

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 400,
        batch_size: int = 64,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, shuffle_seed=shuffle_seed)
        self.save_hyperparameters()
        self.num_train, self.num_val, self.num_test, self.seed = num_train, num_val, num_test, seed

    def _sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mag = 2.0 + 3.0 * torch.rand(n, 1, generator=g)
        sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
        x = mag * sign
        y = toy_function(x) + toy_noise_std(x) * torch.randn(n, 1, generator=g)
        return x, y

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        x_test = torch.linspace(-6, 6, self.num_test).unsqueeze(1)
        y_test = toy_function(x_test) + toy_noise_std(x_test) * torch.randn(self.num_test, 1, generator=g)
        return {
            "train": self._sample(self.num_train, g),
            "val": self._sample(self.num_val, g),
            "test": (x_test, y_test),
        }
