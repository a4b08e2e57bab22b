"""apertus-workbench: interpretability for the Apertus language models, from JupyterLab."""

from workbench.hooked_model import HookedApertus
from workbench.loading import NotApertusError, load

__all__ = ["HookedApertus", "NotApertusError", "load"]
__version__ = "0.1.0"
