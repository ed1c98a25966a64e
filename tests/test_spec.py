import pytest

from pycompart import SpecError
from pycompart.policy.spec import load_spec, load_spec_file, parse_duration, parse_size


def test_defaults_and_full_spec(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('''
[app]
name = "thumbs"
audit_log = "audit.jsonl"
max_message_size = "8MiB"

[compartments.decoder]
trust = "sandbox"
modules = ["json"]
functions = ["thumbs:decode"]
instances = 2
restart = "always"
call_timeout = "250ms"
max_restarts = 3
restart_window = "1m"

[compartments.signer]
trust = "safebox"
call_timeout = "none"
''')
    spec = load_spec_file(path)
    assert spec.name == "thumbs"
    assert spec.audit_log == str(tmp_path / "audit.jsonl")
    assert spec.max_message_size == 8 * 1024 * 1024
    d = spec.compartments["decoder"]
    assert (d.instances, d.restart, d.call_timeout, d.max_restarts, d.restart_window) == (2, "always", 0.25, 3, 60.0)
    assert d.functions == ("thumbs:decode",) and d.modules == ("json",)
    assert spec.compartments["signer"].call_timeout is None
    assert spec.edges() == [("main", "decoder"), ("main", "signer")]


@pytest.mark.parametrize("spec, key, expected", [
    ({"compartments": {"a": {"instances": 0}}}, "compartments.a.instances", "integer from 1"),
    ({"compartments": {"a": {"instances": "two"}}}, "compartments.a.instances", "integer"),
    ({"compartments": {"a": {"instances": "per-thread"}}}, "compartments.a.instances", "per-connection"),
    ({"compartments": {"a": {"trust": "trusting"}}}, "compartments.a.trust", "'sandbox'"),
    ({"compartments": {"a": {"restart": "sometimes"}}}, "compartments.a.restart", "'on-failure'"),
    ({"compartments": {"a": {"call_timeout": "soon"}}}, "compartments.a.call_timeout", "duration"),
    ({"compartments": {"a": {"functions": ["nocolon"]}}}, "compartments.a.functions", "module:function"),
    ({"compartments": {"a": {"modules": ["bad name"]}}}, "compartments.a.modules", "dotted"),
    ({"compartments": {"a": {"typo": 1}}}, "compartments.a.typo", "no such key"),
    ({"compartments": {"a": {"privileges": {"network": "wifi"}}}}, "compartments.a.privileges.network",
     '"loopback"'),
    ({"compartments": {"a": {"privileges": {"network": {"connect": [70000]}}}}},
     "compartments.a.privileges.network.connect", "port numbers"),
    ({"compartments": {"a": {"privileges": {"network": {"conect": [80]}}}}},
     "compartments.a.privileges.network.conect", "no such key"),
    ({"compartments": {"a": {"privileges": {"filesystem": {"read": "/etc"}}}}},
     "compartments.a.privileges.filesystem.read", "list of paths"),
    ({"compartments": {"a": {"privileges": {"filesystem": {"raed": []}}}}},
     "compartments.a.privileges.filesystem.raed", "no such key"),
    ({"compartments": {"a": {"privileges": {"memory": "lots"}}}}, "compartments.a.privileges.memory",
     "size"),
    ({"compartments": {"a": {"privileges": {"cpu_seconds": 0}}}}, "compartments.a.privileges.cpu_seconds",
     "integer from 1"),
    ({"compartments": {"a": {"privileges": {"syscalls": {"allow": ["exec ve"]}}}}},
     "compartments.a.privileges.syscalls.allow", "system call names"),
    ({"compartments": {"a": {"privileges": {"syscalls": {"allow": ["ptrace"], "kill": ["ptrace"]}}}}},
     "compartments.a.privileges.syscalls.allow", "not also in deny or kill"),
    ({"compartments": {"a": {"privileges": {"enforcement": "lax"}}}},
     "compartments.a.privileges.enforcement", "'best-effort'"),
    ({"compartments": {"a": {"privileges": {"environment": ["A B"]}}}},
     "compartments.a.privileges.environment", "variable names"),
    ({"compartments": {"a": {"may_call": ["ghost"]}}}, "compartments.a.may_call", "defined in this spec"),
    ({"compartments": {"main": {}}}, "compartments.main.privileges", "a [compartments.main.privileges] table"),
    ({"compartments": {"main": {"privileges": {}, "modules": ["x"]}}}, "compartments.main",
     "main is the program itself, not a compartment"),
    ({"compartments": {"main": {"modules": ["x"]}}}, "compartments.main", "such as [compartments.box]"),
    ({"compartments": {"a": {"may_call": ["b"]}, "b": {"mechanism": "inline"}}}, "compartments.a.may_call",
     "'b' is inline"),
    ({"compartments": {"a": {"functions": ["m:f"]}, "b": {"functions": ["m:f"]}}},
     "compartments.b.functions", "declared in one compartment only"),
    ({"compartments": {"a": {"modules": ["x"]}, "b": {"modules": ["x"]}}}, "compartments.b.modules",
     "placed in one compartment only"),
    ({"compartments": {"a": {"expose": ["1x"]}}}, "compartments.a.expose", "attribute names"),
    ({"compartments": {"a": {"allow_setattr": 1}}}, "compartments.a.allow_setattr", "true or false"),
    ({"compartments": {"a": {"shared": ["nocolon"]}}}, "compartments.a.shared", "module:name"),
    ({"compartments": {"a": {"modules": ["cfg"], "shared": ["cfg:X"]}}}, "compartments.a.shared",
     "data from main"),
    ({"compartments": {"bad name": {}}}, "compartments.bad name", "compartment name"),
    ({"app": {"mechanism": "vm"}}, "app.mechanism", "'process'"),
    ({"app": {"max_message_size": "1KiB"}}, "app.max_message_size", "4KiB"),
    ({"app": {"colour": "red"}}, "app.colour", "no such key"),
    ({"domains": {"edge": {}}}, "domains", "not supported"),
    ({"compartments": []}, "compartments", "a table"),
])
def test_errors_name_key_and_expectation(spec, key, expected):
    with pytest.raises(SpecError) as info:
        load_spec(spec, origin="t.toml")
    err = info.value
    assert err.source == "t.toml" and err.key == key, str(err)
    assert expected in str(err)


def test_a_module_placed_in_main_is_one_error_naming_what_to_do():
    with pytest.raises(SpecError) as info:
        load_spec({"compartments": {"main": {"modules": ["yaml"], "functions": ["m:f"]}}}, origin="t.toml")
    assert len(info.value.errors) == 1, [e.message for e in info.value.errors]
    assert info.value.found == "functions, modules"


def test_error_mentions_what_was_found():
    with pytest.raises(SpecError, match=r"found 'two' \(str\)"):
        load_spec({"compartments": {"a": {"instances": "two"}}})


def test_a_misspelt_key_gets_the_closest_known_one():
    with pytest.raises(SpecError, match=r"did you mean 'call_timeout'\?") as info:
        load_spec({"compartments": {"a": {"call_timeot": "5s"}}})
    assert info.value.key == "compartments.a.call_timeot"
    with pytest.raises(SpecError) as info:
        load_spec({"compartments": {"a": {"zzqq": 1}}})
    assert "did you mean" not in str(info.value) and "known: " in str(info.value)


def test_bad_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[app\n")
    with pytest.raises(SpecError, match="valid TOML"):
        load_spec_file(bad)


@pytest.mark.parametrize("text, seconds", [("5s", 5.0), ("250ms", 0.25), ("2m", 120.0), (3, 3.0), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["0s", "-1s", "5", "s", True, 0, float("inf")])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, n", [("256MiB", 256 << 20), ("64KiB", 64 << 10), ("1GB", 10**9), (4096, 4096)])
def test_sizes(text, n):
    assert parse_size(text) == n


def test_every_mistake_is_reported_at_once():
    """One run names all of them, each with its key path; the first is the
    exception's own key (so ``err.key`` keeps working)."""
    spec = {"app": {"colour": "red"},
            "compartments": {"a": {"instances": "two", "typo": 1,
                                   "privileges": {"memory": "lots", "network": "wifi",
                                                  "filesystem": {"raed": []}}},
                             "bad name": {},
                             "b": {"may_call": ["ghost"], "restart": "sometimes"}},
            "domains": {}}
    with pytest.raises(SpecError) as info:
        load_spec(spec, origin="t.toml")
    keys = [e.key for e in info.value.errors]
    assert keys == ["app.colour", "compartments.a.instances", "compartments.a.privileges.filesystem.raed",
                    "compartments.a.privileges.network", "compartments.a.privileges.memory",
                    "compartments.a.typo", "compartments.bad name", "compartments.b.restart",
                    "domains", "compartments.b.may_call"], keys
    assert info.value.key == "app.colour"
    text = str(info.value)
    assert len(text.splitlines()) == len(keys) and "found 'two' (str)" in text
    assert all(e.source == "t.toml" for e in info.value.errors)
