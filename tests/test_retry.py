import pytest

from tidings.retry import RetryPolicy


def test_delays_grow_exponentially_up_to_the_cap():
    """Without jitter the delay doubles per attempt and never exceeds max_delay."""
    policy = RetryPolicy(max_attempts=10, initial_delay=1, multiplier=2, max_delay=10, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.longest_delay == 10


def test_jitter_only_shortens_and_stays_within_its_fraction():
    """With jitter j each delay lies in [(1 - j) * base, base]."""
    policy = RetryPolicy(initial_delay=4, jitter=0.5)
    delays = [policy.delay(1) for _ in range(500)]
    assert all(2 <= d <= 4 for d in delays)
    assert len(set(delays)) > 100


def test_should_retry_respects_attempts_and_exception_types():
    """Retry while attempts remain and the error is one retry_on names."""
    policy = RetryPolicy(max_attempts=3, retry_on=(TimeoutError,))
    assert policy.should_retry(TimeoutError(), 1)
    assert policy.should_retry(TimeoutError(), 2)
    assert not policy.should_retry(TimeoutError(), 3)
    assert not policy.should_retry(ValueError(), 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"retry_on": ()},
        {"retry_on": (int,)},
    ],
)
def test_invalid_policies_are_refused_with_the_reason(kwargs):
    """A policy that cannot work is refused when it is made, naming what is wrong."""
    with pytest.raises(ValueError, match="invalid RetryPolicy"):
        RetryPolicy(**kwargs)


def test_a_single_attempt_policy_has_no_delay():
    """max_attempts=1 never retries, so its longest delay is zero."""
    assert RetryPolicy(max_attempts=1).longest_delay == 0
