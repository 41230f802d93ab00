"""EarthTwin models: reference physics (Lorenz-96, SQG) and learned diffusion emulators."""
from emulators.base import Model, Variable
from emulators.registry import model_registry, register_model
from emulators import lorenz96 as _lorenz96, persistence as _persistence, sqg as _sqg  # noqa: F401  (registers)

__all__ = ["Model", "Variable", "model_registry", "register_model"]
