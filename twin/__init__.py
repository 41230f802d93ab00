"""EarthTwin: Earth-system digital twins (the twin object, config, domains, I/O, CLI, BMI)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("earthtwin")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str):
    if name == "Twin":
        from twin.twin import Twin

        return Twin
    raise AttributeError(name)


__all__ = ["Twin", "__version__"]
