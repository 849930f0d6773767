"""MNIST-1D from the ``mnist1d`` package's procedural generator (never its download path)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch

from .._checks import check_choice
from ._tensor_dm import TensorDataModule, seeded_split

#: Generator knobs of the shifted test set (``shift_test=True``), turned up from the package defaults
#: (``iid_noise_scale`` 0.02, ``corr_noise_scale`` 0.25, ``scale_coeff`` 0.4, ``shear_scale`` 0.75).
#: A single CNN1D at 96% test accuracy keeps about 73% on this set.
DEFAULT_SHIFT: dict[str, float] = {
    "iid_noise_scale": 0.05,
    "corr_noise_scale": 0.35,
    "scale_coeff": 0.6,
    "shear_scale": 1.0,
}

#: The generator knobs that a shift may change.
_SHIFT_KNOBS = ("iid_noise_scale", "corr_noise_scale", "scale_coeff", "shear_scale", "max_translation")


def wave_templates() -> dict[str, Any]:
    """Ten templates of another family than the digits: windowed sine waves of 2.5 to 4.5 cycles, both signs.

    Same length (12), time axis and amplitude range (about 0.45) as the digit templates, so the
    generator turns them into signals that differ from MNIST-1D only in their shape.
    """
    import numpy as np
    from mnist1d.data import get_templates

    t = get_templates()["t"]
    s = np.linspace(0.0, 1.0, 12)
    waves = [
        sign * 0.45 * np.sin(2 * math.pi * cycles * s) * np.sin(math.pi * s)
        for cycles in (2.5, 3.0, 3.5, 4.0, 4.5)
        for sign in (1.0, -1.0)
    ]
    return {"x": np.stack(waves), "t": t, "y": np.arange(10)}


@lru_cache(maxsize=8)
def _generate(num_samples: int, seed: int, knobs: tuple[tuple[str, float], ...], waves: bool):
    from .._optional import require

    data = require("mnist1d.data", "data", "MNIST1DDataModule")
    args = data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    for k, v in knobs:
        setattr(args, k, v)
    d = data.make_dataset(args, template=wave_templates() if waves else None)
    x = torch.cat([torch.tensor(d["x"]), torch.tensor(d["x_test"])]).float().unsqueeze(1)
    y = torch.cat([torch.tensor(d["y"]), torch.tensor(d["y_test"])]).long()
    return x, y


def generate_mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    shift: Mapping[str, float] | None = None,
    templates: str = "digits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MNIST-1D procedurally: ``(N, 1, 40)`` float signals and ``(N,)`` labels.

    ``shift`` overrides generator knobs (``iid_noise_scale``, ``corr_noise_scale``, ``scale_coeff``,
    ``shear_scale``, ``max_translation``); ``templates="waves"`` draws from :func:`wave_templates`
    instead of the digit templates (labels then name the wave, not a digit). The generator
    standardises every set it makes by the set's own mean and standard deviation.
    """
    shift = dict(shift or {})
    unknown = sorted(set(shift) - set(_SHIFT_KNOBS))
    if unknown:
        raise ValueError(f"`shift` knobs {unknown} are not generator knobs; use some of {list(_SHIFT_KNOBS)}.")
    check_choice("templates", templates, ("digits", "waves"))
    return _generate(num_samples, seed, tuple(sorted(shift.items())), templates == "waves")


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus, 2020), generated on the fly: 10 classes of 40-sample 1-D signals.

    Extra test sets, served as further test dataloaders after the in-distribution one (index 0), in
    this order when enabled:

    * ``ood="waves"``: an out-of-distribution set of the same size as the test split, made by the same
      generator from another template family (:func:`wave_templates`); ``ood="classes"`` instead holds
      out ``ood_classes`` (removed from train/val/test, their test-split samples become the OOD set).
      :class:`~lightning_ensembles.EnsembleClassifier` reads dataloader 1 as OOD by default.
    * ``shift_test=True``: a covariate-shifted test set (same classes and templates, generator knobs
      ``shift``, default :data:`DEFAULT_SHIFT`, and its own generator seed). It is dataloader 2 with an
      OOD set, else dataloader 1: then set the classifier's ``ood_dataloader_idx`` to ``None``.

    ``test_sets`` names the test dataloaders in order.

    Args:
        batch_size: batch size of every dataloader.
        num_samples: number of signals generated (before the split).
        split: train/val/test fractions.
        seed: seed of the split.
        generator_seed: seed of the signal generator.
        num_workers: dataloader worker processes.
        shuffle_seed: seed of the training order (``None``: ``torch.initial_seed()``).
        ood: ``None``, ``"waves"`` or ``"classes"``: the OOD test set, see above.
        ood_classes: with ``ood="classes"``, the held-out classes.
        shift_test: add the covariate-shifted test set.
        shift: generator knobs of the shifted test set (default :data:`DEFAULT_SHIFT`).

    Example:
        >>> dm = MNIST1DDataModule(num_samples=500, batch_size=16, ood="waves", shift_test=True)
        >>> dm.setup()
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape), dm.test_sets, len(dm.test_dataloader())
        ((16, 1, 40), ('test', 'ood', 'shift'), 3)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_samples: int = 5000,
        split: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        generator_seed: int = 42,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        ood: str | None = None,
        ood_classes: Sequence[int] = (),
        shift_test: bool = False,
        shift: dict[str, float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.split = tuple(split)
        self.seed = seed
        self.generator_seed = generator_seed
        check_choice("ood", ood, (None, "waves", "classes"))
        self.ood = ood
        self.ood_classes = tuple(ood_classes)
        if (ood == "classes") != bool(self.ood_classes):
            raise ValueError(
                "held-out classes need both `ood='classes'` and a non-empty `ood_classes` (e.g. [8, 9]); "
                f"got ood={ood!r}, ood_classes={self.ood_classes}."
            )
        if any(not 0 <= c < 10 for c in self.ood_classes):
            raise ValueError(f"`ood_classes` must be classes 0-9, got {self.ood_classes}.")
        if shift is not None and not shift_test:
            raise ValueError("`shift` sets the knobs of the shifted test set: also pass `shift_test=True`.")
        self.shift_test = shift_test
        self.shift = dict(DEFAULT_SHIFT if shift is None else shift)

    @property
    def test_sets(self) -> tuple[str, ...]:
        """Names of the test dataloaders, in order: ``"test"``, then ``"ood"`` and ``"shift"`` when enabled."""
        return ("test",) + (("ood",) if self.ood else ()) + (("shift",) if self.shift_test else ())

    def build(self):
        x, y = generate_mnist1d(self.num_samples, self.generator_seed)
        tr, va, te = seeded_split(len(y), self.split, self.seed)
        out = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
        # Extra sets as large as the test split, from their own generator seeds (new samples).
        n_extra = len(te)
        if self.ood == "waves":
            out["ood"] = generate_mnist1d(n_extra, self.generator_seed + 1, templates="waves")
        if self.shift_test:
            out["shift"] = generate_mnist1d(n_extra, self.generator_seed + 2, shift=self.shift)
        if self.ood == "classes":
            held_out = torch.tensor(self.ood_classes)
            keep = {k: ~torch.isin(ys, held_out) for k, (_, ys) in out.items()}
            out["ood"] = (x[te][~keep["test"]], y[te][~keep["test"]])
            out.update({k: (xs[keep[k]], ys[keep[k]]) for k, (xs, ys) in out.items() if k != "ood"})
        return out

    def test_dataloader(self):
        if len(self.test_sets) == 1:
            return self._loader("test")
        return [self._loader(name) for name in self.test_sets]
