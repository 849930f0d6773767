"""(d) SWA on every member, post-hoc temperature scaling and reliability diagrams.

    python examples/d_swa_temperature_reliability.py   # diagrams in outputs/examples/.../reliability/

A 4-member deep ensemble on MNIST-1D, where models overfit and become overconfident: SWA averages
each member over the last half of training, TemperatureScaling fits T on the validation set, and
ReliabilityDiagram draws accuracy against confidence before the numbers are printed.
"""

import lightning as L
from _common import parse_args, trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_ensembles import EnsembleClassifier, MemberWeightAveraging, ReliabilityDiagram, TemperatureScaling
from lightning_ensembles.data import MNIST1DDataModule


def main() -> None:
    args = parse_args(__doc__)
    L.seed_everything(0)
    dm = MNIST1DDataModule(batch_size=128, num_samples=4000)
    model = EnsembleClassifier(
        backbone="mlp",
        num_members=4,
        lr=2e-3,
        backbone_kwargs={"in_features": 40, "out_features": 10, "hidden": [256, 256]},
    )
    ts = TemperatureScaling()
    callbacks = [MemberWeightAveraging("swa", attribute="ensemble", start_epoch=0.5), ts, ReliabilityDiagram()]
    t = trainer(args, epochs=30, callbacks=callbacks, logger=CSVLogger(args.out, name="swa_ts"))
    t.fit(model, dm)
    res = t.test(model, dm, verbose=False)[0]
    print(f"\ntest accuracy {res['test/acc']:.4f}; fitted temperature T = {ts.temperature:.3f}")
    print(
        f"ECE {res['test/ts/ece_before']:.4f} -> {res['test/ts/ece_after']:.4f}, "
        f"NLL {res['test/ts/nll_before']:.4f} -> {res['test/ts/nll_after']:.4f}"
    )
    print("reliability diagrams:", ", ".join(str(p) for p in sorted(args.out.rglob("reliability/*.png"))[-2:]))


if __name__ == "__main__":
    main()
