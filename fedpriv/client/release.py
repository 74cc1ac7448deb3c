"""What a silo that trains with DP may send besides its noised update.

Under differential privacy nothing un-noised leaves a silo. A result's metrics
(``train_loss``, a validation accuracy, whatever ``fit`` returns) and its
example count are functions of the private data that no noise covers: a
membership test on a reported training loss works as well as on a model
without DP. So when a silo trains with DP (it has a privacy ledger, or its
client plans a DP mechanism), the runtime filters every result before the
first byte is sent:

- **fit metrics** are dropped, except the accounting values the runtime adds
  itself (``epsilon``, ``epsilon_rdp``, ``delta``, ``noise_multiplier``: public
  by design) and the names the silo opts in to with ``[privacy] share_metrics`` (sent
  un-noised, with a :class:`~fedpriv.errors.PrivacyWarning`);
- **num_examples** of a fit result is ``[privacy] public_num_examples`` when the
  silo declares one, else :data:`DP_NUM_EXAMPLES`; FedAvg then weighs such silos
  equally (DP-FedAvg and secure aggregation always do);
- **evaluation results** pass unchanged only when the silo declares its
  evaluation data public to the federation (``[privacy] public_evaluation``);
  otherwise they are filtered like fit metrics and carry
  :data:`DP_NUM_EXAMPLES`, and an evaluation left with no metric is declined.

Without DP the policy changes nothing: there is no guarantee to keep.

Example:
    >>> policy = ReleasePolicy(share_metrics=("accuracy",))
    >>> release = policy.fit(
    ...     {"train_loss": 0.3, "accuracy": 0.9}, num_examples=137, private=True
    ... )
    >>> release.metrics, release.num_examples, release.dropped
    ({'accuracy': 0.9}, 1, ('train_loss',))
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError, PrivacyWarning
from fedpriv.wire.resources import Resources

__all__ = ["ACCOUNTING_METRICS", "DP_NUM_EXAMPLES", "Release", "ReleasePolicy"]

logger = logging.getLogger(__name__)

#: Metric names the runtime itself adds under DP; they describe the mechanism, not the data.
ACCOUNTING_METRICS: frozenset[str] = frozenset(
    {"epsilon", "epsilon_rdp", "delta", "noise_multiplier"}
)

#: The example count a DP silo reports when it declares none: the same for every dataset
#: (so neighbouring datasets send the same bytes) and the smallest the coordinator accepts.
DP_NUM_EXAMPLES = 1

_MAX_NUM_EXAMPLES = 2**53  # the widest rounds.max_num_examples a coordinator may set


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """The part of one result that may leave the silo.

    Args:
        metrics: The metrics to send.
        num_examples: The example count to send.
        dropped: Names of the metrics that were withheld, sorted.
    """

    metrics: Mapping[str, Scalar]
    num_examples: int
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasePolicy:
    """What a DP silo sends besides its update (the ``[privacy]`` opt-ins).

    Args:
        share_metrics: Metric names sent un-noised even under DP. Their values
            are not covered by the silo's epsilon; the runtime warns at start-up.
        public_evaluation: The silo declares its evaluation data public to the
            federation: evaluation results are sent as the client returns them.
            DP then protects only the training data; whatever evaluation reveals
            about the evaluation records is not covered.
        public_num_examples: The training-set size the silo declares public,
            sent as a fit result's ``num_examples`` under DP (its FedAvg weight).
            None sends :data:`DP_NUM_EXAMPLES`.
        share_resources: Send the silo's pace (seconds per local step, steps of a
            round's full work) under DP too, for the coordinator's pacing policy.
            Measured while training on the private data, it is not covered by the
            silo's epsilon; without it a DP silo sends its hardware alone.

    Raises:
        ConfigError: A name is empty or repeated, or `public_num_examples` is out
            of the coordinator's range [1, 2**53].
    """

    share_metrics: tuple[str, ...] = ()
    public_evaluation: bool = False
    public_num_examples: int | None = None
    share_resources: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"privacy.share_metrics: {name!r} must be a non-empty string"
            for name in self.share_metrics
            if not isinstance(name, str) or not name.strip()
        ]
        repeated = sorted({n for n in self.share_metrics if self.share_metrics.count(n) > 1})
        if repeated:
            problems.append(f"privacy.share_metrics: {', '.join(repeated)} listed twice")
        if self.public_num_examples is not None and not (
            1 <= self.public_num_examples <= _MAX_NUM_EXAMPLES
        ):
            problems.append(
                f"privacy.public_num_examples = {self.public_num_examples}: must be in [1, 2**53]"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def announce(self) -> None:
        """Log the opt-ins at start-up; warn (:class:`PrivacyWarning`) for shared metrics."""
        if self.share_metrics:
            message = (
                f"[privacy] share_metrics = {list(self.share_metrics)}: when this silo trains "
                "with differential privacy these metrics are still sent to the coordinator "
                "un-noised; its epsilon does not cover them. Remove them from share_metrics "
                "to keep every value that leaves the silo under DP."
            )
            logger.warning("%s", message)
            warnings.warn(message, PrivacyWarning, stacklevel=3)
        if self.public_evaluation:
            logger.warning(
                "[privacy] public_evaluation = true: evaluation results are sent as computed; "
                "DP protects only the training data, not the evaluation data"
            )
        if self.share_resources:
            message = (
                "[privacy] share_resources = true: under differential privacy this silo still "
                "sends its pace (seconds per step, steps per round) to the coordinator, "
                "measured on its private data and not covered by its epsilon"
            )
            logger.warning("%s", message)
            warnings.warn(message, PrivacyWarning, stacklevel=3)
        if self.public_num_examples is not None:
            logger.info(
                "[privacy] public_num_examples = %d is sent as the training count under DP",
                self.public_num_examples,
            )

    def _filter(self, metrics: Mapping[str, Scalar]) -> tuple[dict[str, Scalar], tuple[str, ...]]:
        kept = {k: v for k, v in metrics.items() if k in self.share_metrics}
        return kept, tuple(sorted(set(metrics) - set(kept)))

    def fit(self, metrics: Mapping[str, Scalar], *, num_examples: int, private: bool) -> Release:
        """What of a fit result may be sent (before the runtime adds its accounting values).

        Args:
            metrics: The metrics the client's ``fit`` returned.
            num_examples: The client's example count.
            private: Whether the silo trains with DP.
        """
        if not private:
            return Release(metrics=dict(metrics), num_examples=num_examples, dropped=())
        kept, dropped = self._filter(metrics)
        count = DP_NUM_EXAMPLES if self.public_num_examples is None else self.public_num_examples
        return Release(metrics=kept, num_examples=count, dropped=dropped)

    def resources(self, resources: Resources, *, private: bool) -> Resources:
        """What of the resources may be sent: under DP the hardware alone, unless opted in."""
        return resources if not private or self.share_resources else resources.without_pace()

    def evaluate(
        self, metrics: Mapping[str, Scalar], *, num_examples: int, private: bool
    ) -> Release:
        """What of an evaluation result may be sent; empty metrics mean: decline the task.

        Args:
            metrics: The metrics the client's ``evaluate`` returned.
            num_examples: The client's example count.
            private: Whether the silo trains with DP.
        """
        if not private or self.public_evaluation:
            return Release(metrics=dict(metrics), num_examples=num_examples, dropped=())
        kept, dropped = self._filter(metrics)
        return Release(metrics=kept, num_examples=DP_NUM_EXAMPLES, dropped=dropped)
