"""The Apertus checkpoint that ships inside the package: the default for notebooks and tests."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "apertus-tiny"
