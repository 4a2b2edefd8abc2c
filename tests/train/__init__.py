"""The training tests: a package, so that its conftest.py is imported as train.conftest and never stands in for
tests/conftest.py, whose helpers the other test modules import as conftest."""
