"""Split-conformal prediction sets (LAC, Sadinle, Lei & Wasserman 2019): every class whose calibrated probability is
at least ``1 - qhat``, where ``qhat`` is a finite-sample quantile of ``1 - p(true class)`` on held-out images.

Whatever the model, on new images exchangeable with the calibration images the set contains the true class with
probability at least the chosen coverage (and at most coverage + 1/(n+1)). LAC gives the smallest sets on average of
the standard scores, which is what a user reading one set per cell wants. A set may be empty: no class reaches the
level (the flag says ``uncertain``); forcing the top class in would push coverage up to the model's accuracy.

Written here rather than with MAPIE or TorchCP: MAPIE wraps scikit-learn estimators (a torch model or stored
probabilities need a fake estimator), and TorchCP pulls in transformers, torch-geometric and torchsort; the method
itself is the three lines of ``fit`` and ``sets``. The calibration scores are kept (one float per image, in the model
file) so that ``wbc predict --coverage`` can pick another coverage without recalibrating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wbc_trust import config
from wbc_trust.errors import WbcError

METHOD = "LAC"


def check_coverage(coverage: float) -> float:
    """A coverage must be a probability strictly between 0 and 1 (e.g. 0.95)."""
    if not 0.0 < coverage < 1.0:
        raise WbcError(f"--coverage {coverage} is not between 0 and 1: pass e.g. 0.95 for 95 %")
    return coverage


@dataclass
class SplitConformal:
    """Sorted nonconformity scores ``1 - p(true class)`` of the calibration images, and the default coverage."""

    scores: torch.Tensor
    coverage: float = config.CONFORMAL_COVERAGE

    @classmethod
    def fit(cls, probs: torch.Tensor, labels: torch.Tensor, coverage: float = config.CONFORMAL_COVERAGE) -> SplitConformal:
        """Scores of calibrated probabilities ``probs`` (N×C) on images with known ``labels``."""
        scores = 1.0 - probs[torch.arange(len(labels)), labels]
        return cls(scores.float().sort().values, check_coverage(coverage))

    def qhat(self, coverage: float | None = None) -> float:
        """The ceil((n+1)·coverage)-th smallest score; 1.0 (every class in the set) when n is too small for it."""
        rank = math.ceil((len(self.scores) + 1) * check_coverage(coverage or self.coverage))
        return 1.0 if rank > len(self.scores) else float(self.scores[rank - 1])

    def sets(self, probs: torch.Tensor, coverage: float | None = None) -> torch.Tensor:
        """Boolean N×C membership: class c is in image i's set when 1 - p_ic ≤ qhat."""
        return (1.0 - probs) <= self.qhat(coverage)

    def metadata(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON part (method, coverage, qhat, n) and tensor part (the scores) for the model file."""
        return ({"method": METHOD, "coverage": self.coverage, "qhat": self.qhat(), "n": len(self.scores)},
                {"conformal.scores": self.scores})

    @classmethod
    def from_metadata(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> SplitConformal:
        """Inverse of ``metadata``."""
        return cls(tensors["conformal.scores"].float(), float(meta["coverage"]))
