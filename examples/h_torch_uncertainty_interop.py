"""(h) torch-uncertainty interoperability, both directions, offline.

    pip install 'lightning-ensembles[interop]'
    python examples/h_torch_uncertainty_interop.py

1. A lightning-ensembles deep ensemble trained and tested by torch-uncertainty's ClassificationRoutine
   (its metrics and OOD evaluation), then tested by EnsembleClassifier: the same numbers.
2. torch-uncertainty's Packed-Ensembles and MIMO MLPs trained by EnsembleClassifier
   (`ensemble=from_tu_model(...)`), calibrated by torch-uncertainty's TemperatureScaler through the
   TUCalibration callback.

Data: DigitsTUDataModule, a torch-uncertainty TUDataModule on scikit-learn's digits (every data module
torch-uncertainty ships downloads its data); digits 8 and 9 are held out as the OOD test loader.
"""

import lightning as L
import torch
from _common import parse_args, trainer
from torch_uncertainty.models.mlp import mimo_mlp, packed_mlp
from torch_uncertainty.post_processing import TemperatureScaler

from lightning_ensembles import DeepEnsemble, EnsembleClassifier
from lightning_ensembles.backbones import MLP
from lightning_ensembles.interop.torch_uncertainty import (
    DigitsTUDataModule,
    TUCalibration,
    from_tu_model,
    tu_classification_routine,
)


def main() -> None:
    args = parse_args(__doc__)
    L.seed_everything(0)
    dm = DigitsTUDataModule(batch_size=64, eval_ood=True)
    epochs = 20
    rows = []

    # 1. Ours inside torch-uncertainty. Adam: the routine's mean-over-members loss needs no lr change.
    ensemble = DeepEnsemble(MLP(64, 10, hidden=(128,)), num_members=4)
    routine = tu_classification_routine(
        ensemble,
        num_classes=10,
        eval_ood=True,
        optim_recipe=lambda model: torch.optim.Adam(model.parameters(), lr=3e-3),
    )
    trainer(args, epochs).fit(routine, dm)
    tu = trainer(args, epochs).test(routine, dm, verbose=False)[0]
    rows.append(
        (
            "deep M=4 in ClassificationRoutine",
            tu["test/cls/Acc"],
            tu["test/cls/NLL"],
            tu["test/cls/Brier"],
            tu["ood/AUROC"],
            "-",
        )
    )
    ours = trainer(args, epochs).test(EnsembleClassifier(ensemble=ensemble), dm, verbose=False)[0]
    rows.append(
        (
            "  same weights, EnsembleClassifier",
            ours["test/acc"],
            ours["test/nll"],
            ours["test/brier"],
            ours["test/ood_auroc_msp"],
            "-",
        )
    )

    # 2. torch-uncertainty's models inside EnsembleClassifier, calibrated by its TemperatureScaler.
    builders = {
        "TU packed MLP M=4 alpha=2": lambda: packed_mlp(
            64, 10, hidden_dims=[128], num_estimators=4, alpha=2, flatten_start_dim=1
        ),
        "TU MIMO MLP M=3": lambda: mimo_mlp(64, 10, hidden_dims=[256], num_estimators=3, flatten_start_dim=1),
    }
    for name, build in builders.items():
        model = EnsembleClassifier(ensemble=from_tu_model(build()), lr=3e-3)
        calibration = TUCalibration(TemperatureScaler())
        trainer(args, epochs, callbacks=[calibration]).fit(model, dm)
        res = trainer(args, epochs, callbacks=[calibration]).test(model, dm, verbose=False)[0]
        tag = "test/cal_tu_TemperatureScaler"
        rows.append(
            (
                name,
                res["test/acc"],
                res["test/nll"],
                res["test/brier"],
                res["test/ood_auroc_msp"],
                f"{res[f'{tag}/nll_after']:.4f} (T={calibration.calibrator.scaler.temperature[0].item():.2f})",
            )
        )

    print("\ntorch-uncertainty interop on digits (OOD: held-out digits 8, 9; AUROC of the max probability)")
    print(f"{'model':<36}{'acc':>8}{'NLL':>8}{'Brier':>8}{'AUROC':>8}  NLL after TU temperature scaling")
    for name, acc, nll, brier, auroc, calibrated in rows:
        print(f"{name:<36}{acc:>8.4f}{nll:>8.4f}{brier:>8.4f}{auroc:>8.4f}  {calibrated}")


if __name__ == "__main__":
    main()
