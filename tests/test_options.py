"""runtime/options.py: the switches, read once from the environment, flipped for a block with override()."""

import subprocess
from pathlib import Path

import pytest

from runtime.options import SWITCHES, Options, attribute_of, options


def test_each_switch_reads_its_variable(monkeypatch):
    for switch in SWITCHES:
        monkeypatch.delenv(switch.variable, raising=False)
    assert all(getattr(Options(), s.attribute) == s.default for s in SWITCHES)
    for switch in SWITCHES:
        monkeypatch.setenv(switch.variable, "0" if switch.default else "1")
    assert all(getattr(Options(), s.attribute) != s.default for s in SWITCHES)
    for switch in SWITCHES:  # any other value keeps the default
        monkeypatch.setenv(switch.variable, "yes")
    assert all(getattr(Options(), s.attribute) == s.default for s in SWITCHES)


def test_override_restores_the_values_even_after_an_error():
    before = options.pdl, options.reference
    with pytest.raises(RuntimeError):
        with options.override(pdl=not before[0], reference=not before[1]):
            assert (options.pdl, options.reference) == (not before[0], not before[1])
            raise RuntimeError
    assert (options.pdl, options.reference) == before


def test_override_refuses_unknown_switches_and_the_interpreter():
    with pytest.raises(ValueError, match="unknown switch"):
        with options.override(pld=False):
            pass
    with pytest.raises(ValueError, match="interpret"):
        with options.override(interpret=True):
            pass


def test_attribute_of_names_the_switch():
    assert attribute_of("GPT_OSS_PDL") == "pdl"
    with pytest.raises(ValueError, match="GPT_OSS_NOPE"):
        attribute_of("GPT_OSS_NOPE")


def test_no_module_reads_a_switch_from_the_environment():
    """Only runtime/options.py reads the switches' variables."""
    names = "|".join(s.variable for s in SWITCHES)
    found = subprocess.run(["git", "grep", "-n", "-E", f"environ[^\\n]*({names})", "--", "runtime",
                            "parallel", "launch", "scripts", ":!runtime/options.py"],
                           capture_output=True, text=True)
    assert found.stdout == "", found.stdout


def test_the_readme_table_lists_every_switch_with_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("<!-- switches -->"):readme.index("<!-- /switches -->")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(SWITCHES), rows
    for switch in SWITCHES:
        value, default = ("0", "on") if switch.default else ("1", "off")
        assert f"| `{switch.variable}={value}` | `{switch.attribute}` | {default} |" in table, switch
