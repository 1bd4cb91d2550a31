"""Split-conformal prediction sets: for new images exchangeable with the calibration images, the set contains the
true class with probability at least the chosen coverage.

- ``MondrianConformal`` (what ``wbc calibrate`` and ``wbc train`` fit): class-conditional sets, one quantile per
  class, so each class gets the coverage, not just the average; never empty (the top class is always in); the score
  is LAC, APS or RAPS (``SCORES``; ``config.CONFORMAL_SCORE`` is the one that gave the smallest sets on the default
  model's validation split, docs/trust.md, "Calibration").
- ``SplitConformal``: the marginal LAC sets of model files calibrated before (metadata ``"method": "LAC"``); kept so
  that those files predict exactly as they did. Its sets may be empty and rare classes may get less than the
  coverage (monocytes got 90.6 % at 95 % on the default model's test split). ``wbc adapt`` fits it on a lab's few
  labelled cells, weighted by class where the lab's class prevalence is known (label shift). The weighting is a few
  lines over the stored scores, written here: TorchCP's weighted predictor is for covariate shift (weights from a
  classifier of the images), not for known per-class weights, and the sets must re-threshold from the model file.

Both keep their calibration scores in the model file, so ``wbc predict --coverage`` can pick another coverage
without recalibrating.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wbc_trust import config
from wbc_trust.errors import WbcError

METHOD = "LAC"
MONDRIAN = "mondrian"

logger = logging.getLogger(__name__)


def check_coverage(coverage: float) -> float:
    """A coverage must be a probability strictly between 0 and 1 (e.g. 0.95)."""
    if not 0.0 < coverage < 1.0:
        raise WbcError(f"--coverage {coverage} is not between 0 and 1: pass e.g. 0.95 for 95 %")
    return coverage


@dataclass
class SplitConformal:
    """Marginal LAC (Sadinle, Lei & Wasserman 2019) of older model files: every class whose calibrated probability is
    at least ``1 - qhat``, ``qhat`` a finite-sample quantile of ``1 - p(true class)`` over all calibration images
    (``scores``, sorted)."""

    scores: torch.Tensor
    coverage: float = config.CONFORMAL_COVERAGE
    weights: torch.Tensor | None = None  # one per score (same order), where the images to come differ in class mix

    @property
    def name(self) -> str:
        """What the reports call these sets."""
        return "marginal LAC" + (", weighted by class" if self.weights is not None else "")

    @classmethod
    def fit(
        cls,
        probs: torch.Tensor,
        labels: torch.Tensor,
        coverage: float = config.CONFORMAL_COVERAGE,
        class_weights: torch.Tensor | None = None,
    ) -> SplitConformal:
        """Scores of calibrated probabilities ``probs`` (N×C) on images with known ``labels``. ``class_weights``
        (C): where the images to come hold the classes in other proportions than the calibration images, each
        class's share there over its share here (label shift: Podkopaev & Ramdas, UAI 2021)."""
        scores, order = (1.0 - probs[torch.arange(len(labels)), labels]).float().sort()
        weights = None if class_weights is None else class_weights.float()[labels][order]
        return cls(scores, check_coverage(coverage), weights)

    def qhat(self, coverage: float | None = None) -> float:
        """The ceil((n+1)·coverage)-th smallest score; 1.0 (every class in the set) when n is too small for it.
        Weighted: the smallest score at which the weights up to it reach the coverage of all weights plus the new
        image's own, taken as the largest (its class is unknown), which keeps the guarantee."""
        coverage = check_coverage(coverage or self.coverage)
        if self.weights is None:
            rank = math.ceil((len(self.scores) + 1) * coverage)
            return 1.0 if rank > len(self.scores) else float(self.scores[rank - 1])
        weights = self.weights.double()
        reached = torch.nonzero(weights.cumsum(0) / (weights.sum() + weights.max()) >= coverage)
        return 1.0 if len(reached) == 0 else float(self.scores[reached[0, 0]])

    def sets(self, probs: torch.Tensor, coverage: float | None = None) -> torch.Tensor:
        """Boolean N×C membership: class c is in image i's set when 1 - p_ic ≤ qhat."""
        return (1.0 - probs) <= self.qhat(coverage)

    def metadata(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON part (method, coverage, qhat, n) and tensor part (the scores) for the model file."""
        tensors = {"conformal.scores": self.scores}
        if self.weights is not None:
            tensors["conformal.weights"] = self.weights
        return (
            {
                "method": METHOD,
                "coverage": self.coverage,
                "qhat": self.qhat(),
                "n": len(self.scores),
                "weighted": self.weights is not None,
            },
            tensors,
        )

    @classmethod
    def from_metadata(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> SplitConformal:
        """Inverse of ``metadata``."""
        weights = tensors.get("conformal.weights")
        return cls(tensors["conformal.scores"].float(), float(meta["coverage"]), weights)


# --- class-conditional (Mondrian) sets: what `wbc calibrate` fits now ------------------------------------------------


def lac_scores(probs: torch.Tensor) -> torch.Tensor:
    """LAC (Sadinle et al. 2019): 1 - p(class), for every class of every image (N×C)."""
    return 1.0 - probs


def aps_scores(probs: torch.Tensor) -> torch.Tensor:
    """APS (Romano et al. 2020), not randomised: the probability mass of the classes ranked above a class plus its
    own. Not randomised so that the same image always gets the same set (a reader cannot reproduce a coin flip)."""
    order = probs.argsort(dim=1, descending=True, stable=True)  # ties: the lower class index ranks first
    return torch.empty_like(probs).scatter_(1, order, probs.gather(1, order).cumsum(1))


def raps_scores(probs: torch.Tensor, lam: float = config.RAPS_LAMBDA, k_reg: int = config.RAPS_K_REG) -> torch.Tensor:
    """RAPS (Angelopoulos et al. 2021), not randomised: APS plus ``lam`` for every rank beyond the ``k_reg``-th."""
    order = probs.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(1, probs.shape[1] + 1, dtype=probs.dtype).expand_as(probs)
    ranks = torch.empty_like(probs).scatter_(1, order, positions)
    return aps_scores(probs) + lam * (ranks - k_reg).clamp(min=0)


#: Nonconformity scores by name (higher = the class fits the image worse); the model file stores the name.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"lac": lac_scores, "aps": aps_scores, "raps": raps_scores}


@dataclass
class MondrianConformal:
    """Class-conditional split conformal (Vovk 2012, "Mondrian"; Sadinle et al. 2019 for LAC): one quantile per class,
    from the calibration images of that class only, so every class, rare ones included, is covered at the chosen rate
    (not just the average over classes). Two additions, each of which only adds coverage: the top class is always in
    (sets are never empty), and so is every class of calibrated probability ≥ ``floor`` (where the model hesitates
    the set says so, even for a class whose calibration images were all confidently right: on the default model the
    eosinophil quantile at 0.99 alone would admit eosinophils only from p ≥ 0.97).

    ``scores`` holds each calibration image's score of its true class, grouped by class (``counts[k]`` of class k,
    in class order), which is all ``--coverage`` needs to re-derive the quantiles. Hand-written: MAPIE 1.6 has no
    Mondrian mode, needs a scikit-learn estimator where the model file has stored scores, and its RAPS tunes on an
    internal 20 % split of the calibration images; TorchCP brings heavy dependencies for the same few lines. The
    method is a sort and a per-class order statistic.
    """

    scores: torch.Tensor
    counts: list[int]
    score: str = config.CONFORMAL_SCORE
    coverage: float = config.CONFORMAL_COVERAGE
    floor: float = config.CONFORMAL_FLOOR

    @property
    def name(self) -> str:
        """What the reports call these sets."""
        return f"class-conditional {self.score.upper()}"

    @classmethod
    def fit(
        cls,
        probs: torch.Tensor,
        labels: torch.Tensor,
        coverage: float = config.CONFORMAL_COVERAGE,
        score: str = config.CONFORMAL_SCORE,
        floor: float = config.CONFORMAL_FLOOR,
    ) -> MondrianConformal:
        """Scores of the true class of calibrated probabilities ``probs`` (N×C) on images with known ``labels``."""
        if score not in SCORES:
            raise WbcError(f"unknown conformal score {score!r}: choose one of {', '.join(SCORES)}")
        true = SCORES[score](probs.float())[torch.arange(len(labels)), labels]
        grouped = [true[labels == k].sort().values for k in range(probs.shape[1])]
        fitted = cls(torch.cat(grouped), [len(g) for g in grouped], score, check_coverage(coverage), floor)
        short = [k for k, n in enumerate(fitted.counts) if _rank(n, coverage) > n]
        if short:
            logger.warning(
                "class indices %s have too few calibration images for %.1f %% coverage (each class needs "
                "at least %d): they are in every prediction set",
                short,
                100 * coverage,
                math.ceil(coverage / (1 - coverage)),
            )
        return fitted

    def qhats(self, coverage: float | None = None) -> torch.Tensor:
        """Per class, the ceil((n_k+1)·coverage)-th smallest score of its n_k images; +inf (the class is in every
        set) when n_k is too small for that rank."""
        coverage = check_coverage(coverage or self.coverage)
        out = torch.full((len(self.counts),), math.inf)
        for k, (group, n) in enumerate(zip(self.scores.split(self.counts), self.counts)):
            if _rank(n, coverage) <= n:
                out[k] = group[_rank(n, coverage) - 1]
        return out

    def sets(self, probs: torch.Tensor, coverage: float | None = None) -> torch.Tensor:
        """Boolean N×C membership: class k is in image i's set when its score ≤ the class's quantile or its
        probability ≥ ``floor``; plus the top class of every image."""
        member = (SCORES[self.score](probs.float()) <= self.qhats(coverage)) | (probs >= self.floor)
        member[torch.arange(len(probs)), probs.argmax(1)] = True
        return member

    def metadata(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON part (method, score, coverage, per-class quantiles and counts) and the scores tensor."""
        qhats = [None if math.isinf(q) else q for q in self.qhats().tolist()]
        return (
            {
                "method": MONDRIAN,
                "score": self.score,
                "coverage": self.coverage,
                "floor": self.floor,
                "qhat": qhats,
                "counts": self.counts,
                "n": sum(self.counts),
            },
            {"conformal.scores": self.scores},
        )

    @classmethod
    def from_metadata(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> MondrianConformal:
        """Inverse of ``metadata``."""
        return cls(
            tensors["conformal.scores"].float(),
            [int(n) for n in meta["counts"]],
            meta["score"],
            float(meta["coverage"]),
            float(meta["floor"]),
        )


def _rank(n: int, coverage: float) -> int:
    """The order statistic split conformal takes from n scores: ceil((n + 1)·coverage)."""
    return math.ceil((n + 1) * coverage)


def conformal_from_metadata(meta: dict, tensors: dict[str, torch.Tensor]) -> SplitConformal | MondrianConformal:
    """The prediction sets stored in a model file: Mondrian ones, or the marginal LAC of files calibrated before."""
    return (MondrianConformal if meta.get("method") == MONDRIAN else SplitConformal).from_metadata(meta, tensors)
