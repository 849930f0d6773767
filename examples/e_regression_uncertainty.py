"""(e) Regression with aleatoric and epistemic uncertainty, and a plot of the predictive band.

    python examples/e_regression_uncertainty.py     # writes outputs/examples/regression_band.png
                                                    # and regression_coverage.png

Five Gaussian MLP members on a 1-D heteroscedastic toy with no training data in (-2, 2): the
aleatoric part follows the noise, the epistemic part (member disagreement) rises in the gap.
"""

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _common import parse_args, save_figure, trainer  # noqa: E402

from lightning_ensembles import EnsembleRegressor  # noqa: E402
from lightning_ensembles.data import ToyRegressionDataModule  # noqa: E402
from lightning_ensembles.data.toy_regression import toy_function  # noqa: E402
from lightning_ensembles.metrics import QuantileCalibrationError  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    L.seed_everything(0)
    dm = ToyRegressionDataModule()
    model = EnsembleRegressor(
        backbone="mlp",
        num_members=5,
        lr=5e-3,
        backbone_kwargs={"in_features": 1, "out_features": 2, "hidden": [64, 64]},
    )
    t = trainer(args, epochs=60)
    t.fit(model, dm)
    print(t.test(model, dm, verbose=False)[0])
    x = torch.linspace(-6, 6, 400)[:, None]
    model.eval()
    with torch.no_grad():
        pred = model.predict_step((x,), 0)
    xs, mean = x.squeeze(), pred["mean"].squeeze()
    ale, epi = pred["aleatoric"].squeeze(), pred["epistemic"].squeeze()
    gap = xs.abs() < 2
    print(f"mean epistemic variance: in the gap {epi[gap].mean():.4f}, elsewhere {epi[~gap].mean():.4f}")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xtr, ytr = dm.splits["train"].tensors
    ax.scatter(xtr.squeeze(), ytr.squeeze(), s=4, c="0.6", label="training data")
    ax.plot(xs, toy_function(xs), "k--", lw=1, label="x sin x")
    ax.plot(xs, mean, "C0", label="ensemble mean")
    total = (ale + epi).sqrt()
    ax.fill_between(xs, mean - 2 * total, mean + 2 * total, color="C0", alpha=0.2, label="±2σ total")
    ax.fill_between(xs, mean - 2 * ale.sqrt(), mean + 2 * ale.sqrt(), color="C1", alpha=0.3, label="±2σ aleatoric")
    ax.axvspan(-2, 2, color="C3", alpha=0.06, label="no training data")
    ax.set_ylim(-8, 8)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.set_title("Deep ensemble of 5 Gaussian MLPs: aleatoric vs epistemic uncertainty")
    save_figure(fig, args.out / "regression_band.png", bbox_inches="tight")
    # Calibration of the predictive intervals on the test split: expected vs observed coverage.
    xte, yte = dm.splits["test"].tensors
    with torch.no_grad():
        test = model.predict_step((xte,), 0)
    qce = QuantileCalibrationError()
    qce.update(test["mean"], test["variance"], yte.reshape(test["mean"].shape))
    print(f"quantile calibration error {float(qce.compute()):.4f}")
    save_figure(qce.plot()[0], args.out / "regression_coverage.png")


if __name__ == "__main__":
    main()
