"""Every test writes its run records under its own temporary directory, never into the
project's results/ (where the book's runs live): a test that forgets to set DELVING_RESULTS
still cannot touch them."""

import pytest


@pytest.fixture(autouse=True)
def _private_results(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path_factory.mktemp("results")))
