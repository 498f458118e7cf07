"""The CNN zoo: `list_models()`, `get_model(name, **kwargs)` and the builders themselves."""

from ._api import ZooCNN, get_model, list_models, register_model
from .alexnet import alexnet, alexnet_small
from .googlenet import googlenet

__all__ = ["ZooCNN", "alexnet", "alexnet_small", "get_model", "googlenet", "list_models", "register_model"]
