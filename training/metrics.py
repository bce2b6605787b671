"""The confusion matrix lives in ``agmm_deploy.metrics`` (parity checks use it too); kept importable from here."""

from agmm_deploy.metrics import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
