"""The dependency policy: tested ranges with upper bounds, the lowest versions CI installs, the warning at import."""

import logging
from importlib import metadata

import pytest

from hf_ext import dependencies
from tests.conftest import REPO


def test_every_library_whose_internals_we_touch_has_a_bounded_range():
    ranges = dependencies.supported_ranges()
    assert set(ranges) == set(dependencies.CHECKED)
    for name, specifier in ranges.items():
        assert specifier.startswith(">=") and ",<" in specifier, (name, specifier)


def test_the_installed_versions_are_inside_their_ranges():
    assert dependencies.unsupported_versions() == []


def test_ci_lowest_versions_are_the_lower_bounds():
    pinned = {}
    for line in (REPO / ".ci" / "lowest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name] = version
    for name, specifier in dependencies.supported_ranges().items():
        lower = specifier.split(",")[0].removeprefix(">=")
        assert pinned[name].startswith(lower) and pinned[name].count(".") == 2, (name, pinned[name], specifier)


@pytest.mark.parametrize("version, flagged", [("5.22.2", True), ("5.23.0", False), ("5.24.9", False), ("5.25.0", True),
                                              ("6.0.0", True), ("5.25.0.dev0", True)])
def test_a_transformers_outside_the_range_is_named_with_the_supported_range(version, flagged):
    messages = dependencies.unsupported_versions({"transformers": version})
    assert bool(messages) == flagged
    if flagged:
        assert messages == [
            f"hf_ext: transformers {version} is installed, but hf_ext is tested with transformers>=5.23,<5.25; it may "
            "not work (pip install 'transformers>=5.23,<5.25')"
        ]


def test_the_warning_is_one_log_line_and_not_an_error(monkeypatch, caplog):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.99.0" if name == "transformers" else real(name))
    with caplog.at_level(logging.WARNING, logger="hf_ext"):
        dependencies.warn_about_unsupported_versions()
    assert [r.getMessage() for r in caplog.records] == [
        "hf_ext: transformers 5.99.0 is installed, but hf_ext is tested with transformers>=5.23,<5.25; it may not work "
        "(pip install 'transformers>=5.23,<5.25')"
    ]
