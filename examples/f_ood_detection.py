"""(f) Out-of-distribution detection with a held-out class.

    python examples/f_ood_detection.py

Digits 8 and 9 are removed from training and served as a second test dataloader; EnsembleClassifier
treats it as OOD and reports AUROC / AUPR of three scores: maximum probability, predictive entropy
and mutual information (member disagreement). A single model has no mutual information to offer.
The ROC curve of mutual information is written to outputs/examples/ood_roc_mi.png (OODAUROC.plot()).
"""

import lightning as L
import torch
from _common import parse_args, save_figure, trainer

from lightning_ensembles import MLP, EnsembleClassifier
from lightning_ensembles.data import DigitsDataModule
from lightning_ensembles.metrics import OODAUROC


def main() -> None:
    args = parse_args(__doc__)
    L.seed_everything(0)
    dm = DigitsDataModule(ood_classes=(8, 9))
    model = EnsembleClassifier(backbone=MLP(64, 10, hidden=(128, 128)), num_members=5, lr=3e-3)
    t = trainer(args, epochs=40)
    t.fit(model, dm)
    res = t.test(model, dm, verbose=False)[0]
    print(f"\nin-distribution test accuracy {res['test/acc']:.4f}, NLL {res['test/nll']:.4f}")
    print(f"{'OOD score':<22}{'AUROC':>8}{'AUPR':>8}")
    for key, name in (("msp", "max probability"), ("entropy", "predictive entropy"), ("mi", "mutual information")):
        print(f"{name:<22}{res[f'test/ood_auroc_{key}']:>8.4f}{res[f'test/ood_aupr_{key}']:>8.4f}")
    # The ROC curve behind the mutual-information AUROC, from the predictions of both test loaders.
    loaders = dm.test_dataloader()
    preds = t.predict(model, loaders)  # one list of batch dicts per dataloader: in-distribution, OOD
    roc = OODAUROC()
    for is_ood, batches in enumerate(preds):
        mi = torch.cat([b["mutual_information"] for b in batches]).double()
        roc.update(mi, torch.full_like(mi, is_ood, dtype=torch.long))
    save_figure(roc.plot()[0], args.out / "ood_roc_mi.png")


if __name__ == "__main__":
    main()
