"""Model registry: architectures by name, so a checkpoint's JSON can name its network.

A checkpoint stores ``architecture`` (a registered name) and ``model_config`` (the
model's :meth:`~vizloc_ros.localize.models.base.PoseRegressor.config`); loading it is
``build_model(architecture, **model_config)`` followed by the tensors. New networks
join the zoo with::

    @register_model("my_net")
    def my_net(**kwargs):
        return MyNet(**kwargs)
"""
from __future__ import annotations

from typing import Callable

from vizloc_ros.localize.models.base import PoseRegressor

_REGISTRY: dict[str, Callable[..., PoseRegressor]] = {}


def register_model(name: str):
    """Decorator registering a factory (a function or a PoseRegressor class) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def trained_by(name: str) -> str:
    """The command that makes weights of ``name``: ``vizloc-train`` for the regressors,
    ``vizloc-map`` for scene-coordinate maps (a model class says so in ``trained_by``)."""
    factory = _REGISTRY.get(name)
    return str(getattr(factory, "trained_by", "vizloc-train"))


def build_model(name: str, **kwargs) -> PoseRegressor:
    """Instantiate the architecture registered as ``name`` with constructor ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available models: "
                         f"{', '.join(available_models())}") from None
    model = factory(**kwargs)
    if not isinstance(model, PoseRegressor):
        raise TypeError(f"factory registered as {name!r} returned {type(model).__name__}, "
                        "not a PoseRegressor")
    model.architecture = name
    return model
