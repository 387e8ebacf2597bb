"""Training: one plain-PyTorch loop for every method (tailor.methods), in one process or several."""

from tailor.config import ConfigError, TrainConfig, load_config
from tailor.train.loop import NonFiniteLossError, fit
from tailor.train.run import train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "fit", "load_config", "train"]
