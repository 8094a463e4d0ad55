"""GMNM: trainable Gaussian-mixture nonlinearities for PyTorch.

Pure PyTorch; imports nothing else of the project.
"""

from gmnm import functional
from gmnm.backends import get_backend, set_backend
from gmnm.config import GMNMConfig
from gmnm.modules import GMNMActivation, GMNMLayer, GMNMSoftmax

__all__ = [
    "GMNMActivation",
    "GMNMConfig",
    "GMNMLayer",
    "GMNMSoftmax",
    "functional",
    "get_backend",
    "set_backend",
]
