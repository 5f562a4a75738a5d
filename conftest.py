"""Shared by tests/ and integration/: the fixture plugin and helper modules
in tests/ (trees, oracle, servers, command) become importable."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))

pytest_plugins = ["casync_fixtures"]
