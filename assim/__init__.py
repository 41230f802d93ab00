"""EarthTwin assimilation: observations, operators, filters (LETKF, EnKF, EnSF), blending, metrics."""
from assim.observations import ObservationBatch
from assim.registry import operator_registry, register_operator, register_stage, stage_registry
from assim import (blending as _blending, enkf as _enkf, ensf as _ensf,  # noqa: F401  (fill the registries)
                   letkf as _letkf, operators as _operators, points as _points, repaint as _repaint)

__all__ = ["ObservationBatch", "register_operator", "register_stage", "operator_registry", "stage_registry"]
