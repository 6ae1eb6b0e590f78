"""Evaluation of data attribution: random subsets, retraining ground truth and the LDS."""

from fasttrak.evaluate.lds import LDSResult, lds
from fasttrak.evaluate.retrain import retrain
from fasttrak.evaluate.subsets import sample_subsets

__all__ = ["LDSResult", "lds", "retrain", "sample_subsets"]
