"""Strict case loading: every user mistake names the file and the dotted key."""
import pytest
import yaml

from twin.config import ConfigError, case_to_dict, load_case

GOOD = {
    "name": "t",
    "model": {"kind": "lorenz96", "size": 40, "forcing": 8.0, "dt": 0.05},
    "observations": {"operator": "identity", "every": 1, "error_std": 1.0},
    "ensemble": {"size": 7},
    "assimilation": {"stages": [{"method": "letkf", "inflation": 1.04, "localization_radius": 4}]},
    "run": {"cycles": 10, "burn_in": 2},
}


def write(tmp_path, data, name="case.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_case(path, overrides)
    return e.value


def test_good_case_loads_with_typed_sections(tmp_path):
    case = load_case(write(tmp_path, GOOD))
    assert case.model.config.size == 40 and case.model.kind == "lorenz96"
    assert case.assimilation.stages[0].config.inflation == 1.04
    assert case.method == "letkf"
    assert isinstance(case.observations.error_std, float)
    assert case_to_dict(case)["assimilation"]["stages"][0]["method"] == "letkf"


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["model"].update(not_a_key=1), "model.not_a_key"),
    (lambda d: d["run"].update(cycles="ten"), "run.cycles"),
    (lambda d: d["model"].update(size=-5), "model.size"),
    (lambda d: d["ensemble"].update(size=1.5), "ensemble.size"),
    (lambda d: d["observations"].update(error_std=0), "observations.error_std"),
    (lambda d: d["observations"].update(operator="nope"), "observations.operator"),
    (lambda d: d["assimilation"]["stages"][0].update(method="nope"), "assimilation.stages.0.method"),
    (lambda d: d["assimilation"]["stages"][0].update(inflation=0.5), "assimilation.stages.0.inflation"),
    (lambda d: d["assimilation"]["stages"][0].update(bogus=True), "assimilation.stages.0.bogus"),
    (lambda d: d.update(extra_section={}), "extra_section"),
    (lambda d: d.pop("name"), "name"),
    (lambda d: d["run"].update(burn_in=10), "run.burn_in"),
    (lambda d: d["run"].update(dtype="float16"), "run.dtype"),
    (lambda d: d["model"].update(dt=True), "model.dt"),
])
def test_bad_values_name_file_and_key(tmp_path, mutate, key):
    import copy

    data = copy.deepcopy(GOOD)
    mutate(data)
    path = write(tmp_path, data)
    err = error_of(path)
    assert err.file == str(path)
    assert err.key == key
    assert str(err).startswith(f"{path}: {key}")
    assert "\n" not in str(err)


def test_missing_empty_and_invalid_yaml(tmp_path):
    assert "no such file" in str(error_of(tmp_path / "absent.yaml"))
    assert "empty" in str(error_of(write(tmp_path, "", "e.yaml")))
    err = error_of(write(tmp_path, "name: [unclosed\nmodel: {", "bad.yaml"))
    assert "invalid YAML" in str(err) and "line" in str(err)
    assert "mapping" in str(error_of(write(tmp_path, "- a\n- b\n", "list.yaml")))


def test_overrides_with_list_indices_and_yaml_values(tmp_path):
    path = write(tmp_path, GOOD)
    case = load_case(path, ["assimilation.stages.0.inflation=1.1", "run.cycles=20", "model.size=80"])
    assert case.assimilation.stages[0].config.inflation == 1.1
    assert case.run.cycles == 20 and case.model.config.size == 80
    assert error_of(path, ["assimilation.stages.3.inflation=1"]).key == "assimilation.stages.3"
    assert error_of(path, ["run.cycles"]).key == "run.cycles"
    assert error_of(path, ["run.nonsense=1"]).key == "run.nonsense"
