"""ddcore: dataset distillation as a plain library (no Flower inside).

    from ddcore import distill, load_dataset, model_factory, DistillConfig
"""

from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import Dataset, DataSplits, load_dataset
from ddcore.errors import DDCoreError
from ddcore.methods import METHODS, distill, register_method
from ddcore.models import ModelSpec, build_model, model_factory
from ddcore.summary import Summary
from ddcore.train import evaluate, train_and_evaluate, train_model

__all__ = [
    "METHODS", "DDCoreError", "DataSplits", "Dataset", "DistillConfig", "ModelSpec", "Summary",
    "TrainConfig", "build_model", "distill", "evaluate", "load_dataset", "model_factory",
    "register_method", "train_and_evaluate", "train_model",
]
