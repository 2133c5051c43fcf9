"""The shared parameter checker and profile validation."""

import pytest

from delving.params import Param, ParameterError, check, check_profile, check_value, notebooks, profiles, spec_for


def test_check_value_accepts_and_widens():
    assert check_value("lr", 1, Param("float", "")) == 1.0
    assert isinstance(check_value("lr", 1, Param("float", "")), float)
    assert check_value("xs", [1, 2.5], Param("float-list", "", low=0)) == [1.0, 2.5]
    assert check_value("s", None, Param("str", "", nullable=True)) is None


@pytest.mark.parametrize("value, spec, fragment", [
    (-3, Param("int", "", low=1), ">= 1"),
    ("10", Param("int", "", low=1), "an integer"),
    (True, Param("int", ""), "an integer"),             # a bool is not a count
    (2.5, Param("int", ""), "an integer"),
    ("nope", Param("str", "", choices=("a", "b")), "one of 'a', 'b'"),
    (["a", "x"], Param("str-list", "", choices=("a", "b")), "each one of 'a', 'b'"),
    ([], Param("str-list", ""), "non-empty"),
    (None, Param("int", ""), "an integer"),
    (1.5, Param("float", "", low=0, high=1), "in [0, 1]"),
    ("/no/such/dir", Param("str", "", is_dir=True), "not an existing directory"),
])
def test_check_value_refuses_with_name_value_and_allowed(value, spec, fragment):
    with pytest.raises(ParameterError) as e:
        check_value("depth", value, spec)
    message = str(e.value)
    assert "'depth'" in message and repr(value) in message and fragment in message


def test_check_reads_a_namespace_and_refuses_unknown_names():
    import math
    spec = spec_for("01_variance")
    namespace = {"math": math, "In": [], "_private": 1, "check": check}
    good = {"depth": 5, "width": 8, "kernel_size": 3, "spatial": 8, "activation": "relu", "prelu_a": [0.25],
            "schemes": ["xavier"], "draws": 1, "batch_size": 4, "seed": 0, "device": "cpu"}
    assert set(good) == set(spec)
    assert check("01_variance", {**namespace, **good})["depth"] == 5
    with pytest.raises(ParameterError, match="unknown parameter.*'depht'.*takes: depth"):
        check("01_variance", {**namespace, **good, "depht": 5})
    with pytest.raises(ParameterError, match="'seed' not set"):
        check("01_variance", {k: v for k, v in good.items() if k != "seed"})


def test_every_committed_profile_is_valid():
    assert {"cpu", "gpu-imagenet", "tiny"} <= set(profiles())
    for profile in profiles():
        # Directories a GPU profile names live on the GPU machine, not here.
        check_profile(profile, check_paths=False)


def test_missing_profile_is_refused_with_the_list():
    with pytest.raises(ParameterError, match="profile 'nope' does not exist.*available profiles: .*cpu"):
        check_profile("nope")


def test_profile_with_unknown_name_or_bad_value_is_refused(tmp_path, monkeypatch):
    import delving.params as p
    monkeypatch.setattr(p, "PROFILES_DIR", tmp_path)
    name = notebooks()[0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / f"{name}.yaml").write_text("seed: 1\nsede: 2\n")
    with pytest.raises(ParameterError, match="unknown parameter.*'sede'"):
        check_profile("bad")
    (tmp_path / "bad" / f"{name}.yaml").write_text("seed: -1\n")
    with pytest.raises(ParameterError, match="'seed'.*-1"):
        check_profile("bad")
    (tmp_path / "bad" / f"{name}.yaml").write_text("seed: 1\n")
    (tmp_path / "bad" / "99_nothing.yaml").write_text("seed: 1\n")
    with pytest.raises(ParameterError, match="99_nothing.yaml names no notebook"):
        check_profile("bad")
