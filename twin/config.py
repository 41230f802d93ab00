"""Case files: strict YAML → typed, frozen dataclasses.

Unknown keys, wrong types and bad values raise `ConfigError` naming the file and the dotted key path.
Model and stage sections are parsed into the `Config` dataclass of the registered class their
`kind`/`method` names, so user-registered models and filters get the same strict checking.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from assim.registry import operator_registry, stage_registry
from emulators.registry import model_registry


class ConfigError(Exception):
    """A user error in a case file: `file: key: message`."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(value: float | str, file: str, key: str) -> float:
    """A duration: a number of seconds or a string with a unit ("1200s", "30min", "6h", "50d")."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*(s|min|h|d)\s*", value)
        if not m:
            raise ConfigError(file, key, f"expected a duration like 1200s, 30min, 6h or 50d (got {value!r})")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds > 0:
        raise ConfigError(file, key, f"must be a positive duration (got {value!r})")
    return seconds


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    config: Any


@dataclass(frozen=True)
class StageSpec:
    method: str
    config: Any


@dataclass(frozen=True)
class TruthConfig:
    seed: int = field(default=1, metadata={"help": "seed of the truth run's initial perturbation"})
    spinup_steps: int = field(default=1000, metadata={"min": 0, "help": "model steps discarded before cycle 0"})
    model: Any = field(default=None, metadata={
        "help": "model of the nature run ({kind: ..., ...}, same grid); null = the forecast model"})


@dataclass(frozen=True)
class InitialConfig:
    path: str = field(metadata={
        "help": "CF netCDF file of the initial field on a latitude-longitude grid (1-D or 2-D lat/lon, found "
                "from CF attributes); the run's grid, mask and variables come from it (no truth run)"})
    variables: tuple[str, ...] = field(metadata={"help": "data variables that form the state, in order"})
    time: str | None = field(default=None, metadata={
        "help": "time of the field (ISO 8601, matched to the file's CF time); null = the first"})
    units: tuple[str, ...] = field(default=(), metadata={
        "help": "units inside the twin, one per variable, converted from the file's (K <-> degC, "
                "Pa <-> hPa); empty = the file's"})
    spread: float | tuple[float, ...] | None = field(default=None, metadata={
        "help": "std of the Gaussian member perturbations (one value, or one per variable); null = "
                "ensemble.init_spread, or 0 with members_from"})
    members_from: Literal["times"] | tuple[str, ...] | None = field(default=None, metadata={
        "help": "null: perturb the field; times: the members are ensemble.size consecutive times of the file "
                "from `time` on; a list of files: one member each (same grid and variables)"})
    mask_variable: str | None = field(default=None, metadata={
        "help": "variable of the file that marks valid points (e.g. a land-sea mask); NaN and _FillValue "
                "points are always masked"})
    mask_valid: Literal["nonzero", "zero"] = field(default="nonzero", metadata={
        "help": "which values of mask_variable are valid: nonzero, or zero (a land mask for a sea field)"})


@dataclass(frozen=True)
class ObservationsConfig:
    operator: str = field(default="identity", metadata={"help": "observation operator (registry name)"})
    every: int = field(default=1, metadata={"min": 1, "help": "model steps per assimilation cycle"})
    error_std: float = field(default=1.0, metadata={"gt": 0, "help": "observation error standard deviation"})
    fraction: float = field(default=1.0, metadata={"gt": 0, "max": 1, "help": "fraction of the state observed"})
    seed: int = field(default=3, metadata={"help": "seed of the observation noise and selection"})
    variables: tuple[str, ...] | None = field(default=None, metadata={
        "help": "synthetic observations: the observed variables (null: all)"})
    region: tuple[tuple[int, ...], ...] | None = field(default=None, metadata={
        "help": "synthetic observations: index box [[start, stop], ...] per grid axis (null: the whole grid)"})
    path: str | None = field(default=None, metadata={
        "help": "observation file (CF DSG netCDF point/timeSeries, or CSV); null = synthetic from the truth"})
    time_window: float | None = field(default=None, metadata={
        "gt": 0, "help": "half-width of the window [t-h, t+h) matched to a cycle; null = half a cycle"})
    gross_error_k: float | None = field(default=None, metadata={
        "gt": 0, "help": "reject |y - H(mean)| > k sqrt(sigma_o^2 + sigma_b^2); null = no check"})
    withhold: tuple[str | int, ...] | float | None = field(default=None, metadata={
        "min": 0, "max": 1, "help": "stations of the file not assimilated but verified (stations.nc, summary.json "
                                    "`stations`): a list of station ids, or the fraction of the file's stations "
                                    "drawn with `seed`; null = none"})


@dataclass(frozen=True)
class EnsembleConfig:
    size: int = field(default=20, metadata={"min": 2, "help": "number of members"})
    init_spread: float = field(default=1.0, metadata={"min": 0, "help": "std of the initial perturbations"})
    seed: int = field(default=2, metadata={"help": "seed of the initial ensemble and the filters"})


@dataclass(frozen=True)
class AssimilationConfig:
    stages: tuple[StageSpec, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    cycles: int = field(default=100, metadata={"min": 1, "help": "number of analyses"})
    burn_in: int = field(default=0, metadata={"min": 0, "help": "analyses left out of the averages"})
    out: str = field(default="", metadata={"help": "output folder (default out/<name>)"})
    start: str = field(default="2000-01-01", metadata={"help": "time origin, proleptic Gregorian"})
    dtype: Literal["float64", "float32"] = field(default="float64", metadata={"help": "floating precision"})
    threads: int = field(default=1, metadata={"min": 1, "help": "torch threads per process"})
    device: Literal["cpu"] = field(default="cpu", metadata={"help": "torch device"})
    restart_every: int = field(default=0, metadata={"min": 0, "help": "cycles between checkpoints for --resume (0: none)"})


@dataclass(frozen=True)
class OutputConfig:
    every: int = field(default=1, metadata={"min": 1, "help": "write every k-th cycle"})
    members: Literal["all", "mean"] = field(default="all", metadata={"help": "write all members or mean+spread"})
    figures: bool = field(default=True, metadata={"help": "write figures/*.png"})


@dataclass(frozen=True)
class DomainConfig:
    decomposition: Literal["auto", "serial"] = field(default="auto", metadata={"help": "rank layout"})
    ranks_per_member: int | None = field(default=None, metadata={
        "min": 1, "help": "ranks that share one member block's grid: the ranks form (ranks / K) groups, each "
                          "forecasting a contiguous block of members on the grid split over its K ranks; must "
                          "divide the number of ranks; null: all ranks split the grid; ignored when serial"})


@dataclass(frozen=True)
class CaseConfig:
    name: str
    model: ModelSpec
    truth: TruthConfig = TruthConfig()
    initial: InitialConfig | None = None
    observations: ObservationsConfig = ObservationsConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    assimilation: AssimilationConfig = AssimilationConfig()
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()
    domain: DomainConfig = DomainConfig()

    @property
    def method(self) -> str:
        return "+".join(s.method for s in self.assimilation.stages) or "none"


# ---------------------------------------------------------------- strict parsing

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(tp: Any, value: Any, key: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error, with its key path
            return _coerce(options[0], value, key, file)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, file)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(file, key, " or ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(file, key, f"must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected a list (got {type(value).__name__})")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}.{i}", file) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, key, file)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, f"expected an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, f"expected a number (got {value!r})")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(file, key, f"must be finite (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string (got {value!r})")
        return value
    raise ConfigError(file, key, f"unsupported type {tp}")


def _check_bounds(f: dataclasses.Field, value: Any, key: str, file: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    meta = f.metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(file, key, f"must be >= {meta['min']} (got {value})")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(file, key, f"must be > {meta['gt']} (got {value})")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(file, key, f"must be <= {meta['max']} (got {value})")


def parse_dataclass(cls: type, data: Any, key: str, file: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, rejecting unknown keys and bad values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, key, f"expected a mapping (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{key}.{k}" if key else str(k)
            raise ConfigError(file, where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{key}.{f.name}" if key else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(file, sub, "missing required key")
            continue
        value = _coerce(hints[f.name], data[f.name], sub, file)
        _check_bounds(f, value, sub, file)
        kwargs[f.name] = value
    return cls(**kwargs)


def _parse_registered(data: Any, key: str, file: str, tag: str, registry: dict[str, type]) -> tuple[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, key, f"expected a mapping with `{tag}` (got {type(data).__name__})")
    body = dict(data)
    name = body.pop(tag, None)
    if not isinstance(name, str):
        raise ConfigError(file, f"{key}.{tag}", f"missing or not a string (one of: {', '.join(sorted(registry))})")
    if name not in registry:
        raise ConfigError(file, f"{key}.{tag}", f"unknown {tag} {name!r} (one of: {', '.join(sorted(registry))})")
    return name, parse_dataclass(registry[name].Config, body, key, file)


def _parse_case(raw: Any, file: str) -> CaseConfig:
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "a case file must be a YAML mapping")
    raw = dict(raw)
    model = raw.pop("model", None)
    if model is None:
        raise ConfigError(file, "model", "missing required key")
    assimilation = raw.pop("assimilation", None) or {}
    if not isinstance(assimilation, dict):
        raise ConfigError(file, "assimilation", "expected a mapping")
    assimilation = dict(assimilation)
    stages_raw = assimilation.pop("stages", [])
    if assimilation:
        raise ConfigError(file, f"assimilation.{next(iter(assimilation))}", "unknown key (known: stages)")
    if not isinstance(stages_raw, list):
        raise ConfigError(file, "assimilation.stages", "expected a list of stages")
    stages = []
    for i, s in enumerate(stages_raw):
        method, cfg = _parse_registered(s, f"assimilation.stages.{i}", file, "method", stage_registry)
        stages.append(StageSpec(method, cfg))
    kind, model_cfg = _parse_registered(model, "model", file, "kind", model_registry)
    truth_model = None
    if isinstance(raw.get("truth"), dict) and raw["truth"].get("model") is not None:
        raw["truth"] = dict(raw["truth"])
        truth_kind, truth_cfg = _parse_registered(raw["truth"].pop("model"), "truth.model", file, "kind", model_registry)
        truth_model = ModelSpec(truth_kind, truth_cfg)
    hints = typing.get_type_hints(CaseConfig)
    simple = {f.name for f in dataclasses.fields(CaseConfig)} - {"model", "assimilation"}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in simple:
            known = ", ".join(sorted(simple | {"model", "assimilation"}))
            raise ConfigError(file, str(k), f"unknown key (known: {known})")
        kwargs[k] = _coerce(hints[k], v, k, file)
    if "name" not in kwargs:
        raise ConfigError(file, "name", "missing required key")
    if truth_model is not None:
        kwargs["truth"] = dataclasses.replace(kwargs["truth"], model=truth_model)
    case = CaseConfig(model=ModelSpec(kind, model_cfg), assimilation=AssimilationConfig(tuple(stages)), **kwargs)
    _validate(case, file)
    return case


def _validate(case: CaseConfig, file: str) -> None:
    """Cross-field checks and the registered classes' own validation."""
    if case.run.burn_in >= case.run.cycles:
        raise ConfigError(file, "run.burn_in", f"must be < run.cycles ({case.run.cycles})")
    if case.observations.operator not in operator_registry:
        raise ConfigError(file, "observations.operator",
                          f"unknown operator {case.observations.operator!r} (one of: {', '.join(sorted(operator_registry))})")
    for i, spec in enumerate(case.assimilation.stages):
        try:
            stage_registry[spec.method](spec.config)
        except (ValueError, TypeError) as e:
            raise ConfigError(file, f"assimilation.stages.{i}", str(e)) from None
    try:
        validate_model = getattr(model_registry[case.model.kind], "validate", None)
        if validate_model is not None:
            validate_model(case.model.config)
    except ValueError as e:
        raise ConfigError(file, "model", str(e)) from None
    if case.observations.withhold is not None and case.observations.path is None:
        raise ConfigError(file, "observations.withhold", "needs station observations from a file (observations.path)")
    points = _validate_initial(case, file) if case.initial is not None else None
    if case.truth.model is not None:
        grids = [model_registry[m.kind].global_grid(m.config) for m in (case.model, case.truth.model)]
        if grids[0].shape != grids[1].shape:
            raise ConfigError(file, "truth.model", f"grid {grids[1].shape} differs from the forecast model's {grids[0].shape}")
    if points is None:
        try:
            points = model_registry[case.model.kind].global_grid(case.model.config).size
        except ValueError as e:
            raise ConfigError(file, "model", str(e)) from None
    _check_memory(case, file, points)


def _validate_initial(case: CaseConfig, file: str) -> int:
    """`initial:` needs a model that runs on the data grid and observations from a file; the file
    itself is checked (axes, variables, time, units) without reading the fields. Returns the grid size."""
    from twin.initial import initial_grid

    kind = case.model.kind
    if not getattr(model_registry[kind], "data_grid", False):
        data_models = ", ".join(sorted(k for k, c in model_registry.items() if getattr(c, "data_grid", False)))
        raise ConfigError(file, "initial", f"model kind {kind!r} runs on its own grid; `initial:` needs a model "
                          f"that runs on the file's grid ({data_models})")
    if case.observations.path is None:
        raise ConfigError(file, "observations.path", "needed with `initial:` (there is no truth run to observe)")
    if case.truth.model is not None:
        raise ConfigError(file, "truth.model", "a run with `initial:` has no truth run")
    return initial_grid(case.initial, case.ensemble.size, file).size


def _physical_memory() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def estimated_bytes(case: CaseConfig, points: int | None = None) -> int:
    """A rough upper estimate of a run's memory: ensemble with model temporaries, plus what the
    recorder keeps for the output files (all members or mean and spread at every written cycle).
    `points`: the grid size (default: the model's grid)."""
    cls = model_registry[case.model.kind]
    if points is None:
        points = cls.global_grid(case.model.config).size
    n_vars = len(case.initial.variables) if case.initial is not None else len(getattr(cls, "variables", (None,)))
    state = points * n_vars
    itemsize = 8 if case.run.dtype == "float64" else 4
    members = case.ensemble.size
    written = -(-case.run.cycles // case.output.every)
    kept = (members if case.output.members == "all" else 2) + 3  # + background mean, spread, truth
    return itemsize * state * ((members + 2) * 8 + written * kept)


def _check_memory(case: CaseConfig, file: str, points: int) -> None:
    need, have = estimated_bytes(case, points), int(0.8 * _physical_memory())
    if need > have:
        raise ConfigError(file, "model.size", f"the run needs about {need / 2**30:.1f} GiB of memory, more than the "
                          f"{have / 2**30:.1f} GiB available (shrink model.size, ensemble.size or run.cycles, "
                          f"or thin output.every / output.members: mean)")


# ---------------------------------------------------------------- overrides and loading


def apply_override(raw: dict, assignment: str, file: str) -> None:
    """Apply one `a.b.0.c=value` override (value parsed as YAML) to the raw mapping in place."""
    if "=" not in assignment:
        raise ConfigError(file, assignment, "an override must look like key.path=value")
    path, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(file, path, f"override value is not valid YAML: {e}".splitlines()[0]) from None
    keys = path.split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(file, where, f"no list item {k} (the list has {len(node)})")
            if last:
                node[int(k)] = value
            else:
                node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise ConfigError(file, where, "cannot set a key inside a scalar")


def read_yaml(path: str | Path) -> Any:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(file, "", f"cannot read: {e.__class__.__name__}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(file, "", f"invalid YAML: {where}{problem}") from None


def load_case(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CaseConfig:
    """Read, override and strictly validate a case file."""
    file = str(path)
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(file, "", "the case file is empty")
    raw = copy.deepcopy(raw)
    if isinstance(raw, dict):
        for o in overrides:
            apply_override(raw, o, file)
    return _parse_case(raw, file)


def case_to_dict(case: CaseConfig) -> dict:
    """The resolved case as plain YAML-able data (model and stage configs flattened back)."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, ModelSpec):
            return {"kind": obj.kind, **plain(obj.config)}
        if isinstance(obj, StageSpec):
            return {"method": obj.method, **plain(obj.config)}
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    return plain(case)


def keys_table() -> str:
    """Markdown tables of every case key with type, default and help, generated from the dataclasses."""

    def type_name(tp: Any) -> str:
        if typing.get_origin(tp) in (Union, types.UnionType):
            return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
        return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")

    def rows(cls: type, prefix: str) -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            tp = type_name(hints[f.name])
            out.append(f"| `{prefix}{f.name}` | {tp} | `{default}` | {f.metadata.get('help', '')} |")
        return out

    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    sections = [("Case", ["| `name` | str | required | case name (summary.json `case`) |"])]
    hints = typing.get_type_hints(CaseConfig)
    for f in dataclasses.fields(CaseConfig):
        section = next((t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if dataclasses.is_dataclass(t)),
                       None)
        if section is not None and f.name not in ("model", "assimilation"):
            sections.append((f"`{f.name}`", rows(section, f"{f.name}.")))
    for name, cls in sorted(model_registry.items()):
        sections.append((f"model `kind: {name}`", rows(cls.Config, "model.")))
    for name, cls in sorted(stage_registry.items()):
        sections.append((f"stage `method: {name}`", rows(cls.Config, "")))
    return "\n\n".join(f"#### {title}\n\n" + "\n".join(head + body) for title, body in sections)
