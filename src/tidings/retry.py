"""``RetryPolicy``: how often, and how far apart, a failing handler is tried again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter for one handler.

    Attempt 1 is the first delivery. After attempt ``n`` fails with an exception that
    ``retry_on`` matches, attempt ``n + 1`` runs after :meth:`delay` seconds, until
    ``max_attempts`` tries were made; then the delivery is dead-lettered. An exception that
    ``retry_on`` does not match is dead-lettered at once. Input that cannot be decoded is never
    retried: the same bytes fail the same way.

    Attributes:
        max_attempts: tries in all, the first included (1 means never retry).
        initial_delay: seconds before the second attempt.
        multiplier: growth of the delay per attempt.
        max_delay: cap on any one delay, in seconds.
        jitter: fraction of each delay drawn at random (0 = none, 1 = anywhere from 0 to the
            full delay), so that retries of many failed deliveries spread out.
        retry_on: the exception types worth retrying.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append("max_attempts must be >= 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            problems.append("delays must be >= 0 seconds")
        if self.multiplier < 1:
            problems.append("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            problems.append("jitter must be between 0 and 1")
        if not self.retry_on or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on
        ):
            problems.append("retry_on must be a non-empty tuple of exception types")
        if problems:
            msg = "invalid RetryPolicy: " + "; ".join(problems)
            raise ValueError(msg)

    @property
    def longest_delay(self) -> float:
        """The longest delay this policy can ask for, in seconds (jitter only shortens)."""
        if self.max_attempts < 2:
            return 0.0
        return min(self.max_delay, self.initial_delay * self.multiplier ** (self.max_attempts - 2))

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt ``attempt``, which failed with ``error``, earns another try."""
        return attempt < self.max_attempts and isinstance(error, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt`` (which failed)."""
        # Bounded before it is computed: a float power of a large attempt would overflow.
        try:
            grown = self.initial_delay * self.multiplier ** max(0, min(attempt - 1, 10_000))
        except OverflowError:
            grown = self.max_delay
        base = min(self.max_delay, grown)
        return base * (1 - self.jitter * random.random())  # noqa: S311 - spreading, not secrecy


NEVER = RetryPolicy(max_attempts=1)
"""Dead-letter on the first failure."""
