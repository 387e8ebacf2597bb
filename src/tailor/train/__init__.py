"""Training: our own plain-PyTorch loop for LoRA and full fine-tuning."""

from tailor.train.config import ConfigError, TrainConfig, load_config
from tailor.train.loop import NonFiniteLossError, fit, validation_loss
from tailor.train.loss import supervised_loss
from tailor.train.run import train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "fit", "load_config", "supervised_loss",
           "train", "validation_loss"]
