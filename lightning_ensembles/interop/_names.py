"""The names :mod:`lightning_ensembles.interop.torch_uncertainty` exports (known without importing it)."""

TU_NAMES = (
    "DigitsTUDataModule",
    "TUCalibration",
    "TUEnsemble",
    "TUModel",
    "TUScaler",
    "as_tu_model",
    "from_tu_model",
    "tu_classification_routine",
)
