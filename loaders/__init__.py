"""Loaders: a file or directory -> `Checkpoint(config, weights, tokenizer)`."""

from .base import Checkpoint
from .registry import detect, load_checkpoint

__all__ = ["Checkpoint", "detect", "load_checkpoint"]
