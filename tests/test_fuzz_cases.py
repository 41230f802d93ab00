"""Fuzzed case files: every mutation is either valid or rejected with exit 2 and one line naming
the file (and the key where there is one); never a traceback, never an output folder."""
import contextlib
import copy
import io
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from twin.cli import main

BASE = yaml.safe_load((Path(__file__).parents[1] / "cases" / "lorenz96_letkf.yaml").read_text())


def paths(node, prefix=()):
    """Every dotted key path in the case (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from paths(v, prefix + (k,))


ALL_PATHS = list(paths(BASE))
BAD_VALUES = st.one_of(
    st.sampled_from([-1, 0, -10**9, 10**12, 10**300, 1e308, float("nan"), float("inf"), True, None, "",
                     "ünïcødé ☃", [], {}, [1, 2], {"a": 1}, "1e3", "letkf", "float16"]),
    st.text(max_size=20), st.integers(), st.floats(allow_nan=True))


def set_at(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def drop_at(data, path):
    node = data
    for k in path[:-1]:
        node = node[k]
    if isinstance(node, dict):
        del node[path[-1]]
    else:
        node.pop(path[-1])


@st.composite
def mutated_cases(draw):
    kind = draw(st.sampled_from(["value", "drop", "unknown_key", "text"]))
    data = copy.deepcopy(BASE)
    path = draw(st.sampled_from(ALL_PATHS))
    if kind == "value":
        set_at(data, path, draw(BAD_VALUES))
    elif kind == "drop":
        drop_at(data, path)
    elif kind == "unknown_key":
        parent = path[:-1]
        node = data
        for k in parent:
            node = node[k]
        if isinstance(node, dict):
            node[draw(st.sampled_from(["bogus", "Ünknown", "inflaton", "sise"]))] = 1
            path = parent + ("bogus",)
        else:
            set_at(data, path, {"method": draw(st.sampled_from(["nope", "LETKF", "ensf2"]))})
    if kind == "text":
        text = yaml.safe_dump(data, allow_unicode=True)
        cut = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(["", ":", "{", "[", "\t", "- x\n", "\x00", "key: [1,\n", "☃: {"]))
        return text[:cut] + junk + text[cut + draw(st.integers(0, 5)):], None
    return yaml.safe_dump(data, allow_unicode=True), path


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated_cases())
def test_fuzzed_case_files(tmp_path, case):
    text, path = case
    f = tmp_path / "fuzzed.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    rc, err = run_cli(["validate", str(f)])
    assert rc in (0, 2)
    if rc == 0:
        return
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(f) in err and "Traceback" not in err
    if path is not None and path[-1] != "bogus":
        dotted = ".".join(map(str, path))
        prefixes = [".".join(map(str, path[:i])) for i in range(1, len(path) + 1)]
        assert any(p in err for p in prefixes) or "missing required key" in err, (dotted, err)
    out = tmp_path / "never"
    rc_run, err_run = run_cli(["run", str(f), "--out", str(out), "--quiet"])
    assert rc_run == 2 and err_run == err
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_oversized_case_is_a_user_error(tmp_path):
    f = tmp_path / "huge.yaml"
    data = copy.deepcopy(BASE)
    data["model"]["size"] = 10**12
    f.write_text(yaml.safe_dump(data))
    rc, err = run_cli(["run", str(f), "--out", str(tmp_path / "o")])
    assert rc == 2 and "model.size" in err and "memory" in err
