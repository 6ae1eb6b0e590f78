"""Evaluation of data attribution: random subsets, retraining ground truth, the LDS and the
counterfactual removal check."""

from fasttrak.evaluate.lds import LDSResult, lds
from fasttrak.evaluate.removal import RemovalResult, removal
from fasttrak.evaluate.retrain import retrain
from fasttrak.evaluate.subsets import sample_subsets

__all__ = ["LDSResult", "RemovalResult", "lds", "removal", "retrain", "sample_subsets"]
