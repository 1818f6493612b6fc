"""The reference folder of official files, present beside a developer's checkout but not in a user's clone.

Tests that compare with those files are marked ``reference``; conftest skips
them, naming the folder, when it is absent. CI runs the suite both ways.
"""

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen3_5_2b"
requires_reference = pytest.mark.reference
