"""EarthTwin models: reference physics (Lorenz-96, SQG) and learned diffusion emulators."""
from emulators.base import Model, Variable
from emulators.registry import model_registry, register_model
from emulators import diffusion as _diffusion, lorenz96 as _lorenz96  # noqa: F401  (fill the registry)
from emulators import climatology as _climatology, persistence as _persistence, sqg as _sqg  # noqa: F401

__all__ = ["Model", "Variable", "model_registry", "register_model"]
