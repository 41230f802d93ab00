"""EarthTwin models: reference physics (Lorenz-96, SQG) and learned diffusion emulators."""
from emulators.base import Model, Variable
from emulators.registry import model_registry, register_model
from emulators import lorenz96 as _lorenz96, persistence as _persistence  # noqa: F401  (registers them)

__all__ = ["Model", "Variable", "model_registry", "register_model"]
