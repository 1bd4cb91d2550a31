"""wbc-trust: classify white blood cells in microscope images and tell how far to trust each answer."""

import os

from wbc_trust import config

# OpenMP reads its wait policy once, when torch loads its runtime: so here, before any wbc_trust module imports torch
# (the environment's own setting wins; see config.OMP_WAIT_POLICY for why)
os.environ.setdefault("OMP_WAIT_POLICY", config.OMP_WAIT_POLICY)

__version__ = "0.1.0"
