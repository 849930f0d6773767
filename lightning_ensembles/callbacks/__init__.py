"""Trainer callbacks that plug ensembles, averaging and calibration into any LightningModule."""
