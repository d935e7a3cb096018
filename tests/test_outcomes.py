"""The outcome table of docs/contract.md: how a processing result becomes ack, nak or dead-letter."""

from __future__ import annotations

import pytest

from uploads_consumer.errors import ErrorClass, PermanentError, ProcessorTimeout, ResourceLimit, RetryableError
from uploads_consumer.settler import (
    CopyFailed,
    DeadLetter,
    Hold,
    Limits,
    Nak,
    ShuttingDown,
    backoff_delay,
    decide,
)

BACKOFF = (2.0, 10.0, 30.0, 120.0, 300.0)  # the spec's default RETRY_BACKOFF
UNLIMITED = Limits(-1, -1)


def daemon_limit(n: int) -> Limits:
    """MAX_DELIVER=n, enforced by the daemon; the consumer itself has no limit (as setup creates it)."""
    return Limits(max_deliver=n, server_max_deliver=-1)


def server_limit(n: int) -> Limits:
    """A consumer made elsewhere with its own max_deliver=n; MAX_DELIVER unset."""
    return Limits(max_deliver=-1, server_max_deliver=n)


DEAD_LETTER_CLASSES = [c for c in ErrorClass if c is not ErrorClass.TRANSIENT]


def test_every_permanent_class_of_the_spec_is_covered():
    assert {str(c) for c in DEAD_LETTER_CLASSES} == {
        "invalid_message",
        "forbidden",
        "not_found",
        "too_large",
        "bad_envelope",
        "decrypt_failed",
        "processor_failed",
        "max_deliveries",
        "type_not_allowed",
        "infected",
        "unsupported_media",
        "resource_limit",
        "processor_timeout",
    }


@pytest.mark.parametrize("error_class", DEAD_LETTER_CLASSES, ids=str)
def test_permanent_error_is_dead_lettered_with_its_class_and_reason(error_class):
    outcome = PermanentError(error_class, f"something {error_class} happened")
    assert decide(outcome, 1, UNLIMITED, BACKOFF) == DeadLetter(error_class, f"something {error_class} happened")


@pytest.mark.parametrize("error_class", DEAD_LETTER_CLASSES, ids=str)
def test_permanent_error_is_dead_lettered_even_on_a_later_delivery(error_class):
    decision = decide(PermanentError(error_class, "nope"), 4, daemon_limit(10), BACKOFF)
    assert isinstance(decision, DeadLetter)
    assert decision.error_class is error_class


def test_permanent_error_cannot_have_the_transient_class():
    with pytest.raises(ValueError):
        PermanentError(ErrorClass.TRANSIENT, "should be retryable")


@pytest.mark.parametrize(
    ("num_delivered", "delay"),
    [(1, 2.0), (2, 10.0), (3, 30.0), (4, 120.0), (5, 300.0), (6, 300.0), (50, 300.0)],
)
def test_retryable_error_is_nakked_with_backoff_by_delivery_count(num_delivered, delay):
    assert decide(RetryableError("S3 returned 503"), num_delivered, UNLIMITED, BACKOFF) == Nak(delay, "S3 returned 503")


def test_retryable_error_with_its_own_delay_uses_that_delay():
    assert decide(RetryableError("throttled", delay=42.5), 1, UNLIMITED, BACKOFF) == Nak(42.5, "throttled")


def test_retryable_error_with_its_own_delay_ignores_the_delivery_count():
    assert decide(RetryableError("throttled", delay=7.0), 5, UNLIMITED, BACKOFF).delay == 7.0


def test_unexpected_exception_is_transient_with_a_one_line_reason():
    decision = decide(KeyError("line one\nline two"), 1, UNLIMITED, BACKOFF)
    assert isinstance(decision, Nak)
    assert decision.delay == 2.0
    assert "KeyError" in decision.reason
    assert "\n" not in decision.reason
    assert "line one" in decision.reason and "line two" in decision.reason


def test_unexpected_exception_follows_the_backoff_too():
    assert decide(RuntimeError("boom"), 3, UNLIMITED, BACKOFF).delay == 30.0


def test_retryable_error_at_max_deliver_is_dead_lettered_as_max_deliveries():
    decision = decide(RetryableError("S3 returned 503"), 5, daemon_limit(5), BACKOFF)
    assert isinstance(decision, DeadLetter)
    assert decision.error_class is ErrorClass.MAX_DELIVERIES
    assert "S3 returned 503" in decision.reason


def test_retryable_error_beyond_max_deliver_is_dead_lettered_as_max_deliveries():
    decision = decide(RetryableError("timeout"), 9, daemon_limit(5), BACKOFF)
    assert decision == DeadLetter(ErrorClass.MAX_DELIVERIES, decision.reason)
    assert "timeout" in decision.reason


def test_unexpected_exception_at_max_deliver_is_dead_lettered_with_the_last_error():
    decision = decide(KeyError("missing"), 3, daemon_limit(3), BACKOFF)
    assert isinstance(decision, DeadLetter)
    assert decision.error_class is ErrorClass.MAX_DELIVERIES
    assert "KeyError" in decision.reason


def test_retryable_error_before_max_deliver_is_still_nakked():
    assert decide(RetryableError("again"), 4, daemon_limit(5), BACKOFF) == Nak(120.0, "again")


@pytest.mark.parametrize("num_delivered", [1, 5, 100, 10_000])
def test_unlimited_max_deliver_never_gives_up(num_delivered):
    decision = decide(RetryableError("again"), num_delivered, UNLIMITED, BACKOFF)
    assert isinstance(decision, Nak)


def test_shutting_down_is_nakked_without_delay():
    decision = decide(ShuttingDown(), 1, UNLIMITED, BACKOFF)
    assert isinstance(decision, Nak)
    assert decision.delay is None


def test_shutting_down_at_the_daemons_own_limit_is_still_handed_back():
    # The consumer has no server-side limit: the server delivers it again, and the daemon decides then.
    decision = decide(ShuttingDown(), 5, daemon_limit(5), BACKOFF)
    assert decision == Nak(None, decision.reason)


def test_shutting_down_on_the_consumers_last_delivery_is_dead_lettered_not_nakked():
    # A nak on the server's last allowed delivery would lose the message: the server never sends it again.
    decision = decide(ShuttingDown(), 3, server_limit(3), BACKOFF)
    assert isinstance(decision, DeadLetter)
    assert decision.error_class is ErrorClass.MAX_DELIVERIES
    assert "last" in decision.reason and "replay" in decision.reason


def test_retryable_error_on_the_consumers_last_delivery_is_dead_lettered():
    decision = decide(RetryableError("S3 returned 503"), 2, server_limit(2), BACKOFF)
    assert isinstance(decision, DeadLetter)
    assert decision.error_class is ErrorClass.MAX_DELIVERIES


def test_the_smaller_of_the_two_limits_applies():
    assert isinstance(decide(RetryableError("x"), 3, Limits(3, 10), BACKOFF), DeadLetter)
    assert isinstance(decide(RetryableError("x"), 3, Limits(10, 3), BACKOFF), DeadLetter)
    assert isinstance(decide(RetryableError("x"), 2, Limits(10, 3), BACKOFF), Nak)


def test_a_failed_dead_letter_copy_is_nakked_while_the_server_will_deliver_again():
    decision = decide(CopyFailed("timeout"), 1, UNLIMITED, BACKOFF)
    assert isinstance(decision, Nak)
    assert decision.delay == 2.0 and "timeout" in decision.reason


def test_a_failed_dead_letter_copy_on_the_last_delivery_is_held_never_nakked():
    decision = decide(CopyFailed("no responders"), 4, server_limit(4), BACKOFF)
    assert isinstance(decision, Hold)
    assert decision.delay == 120.0 and "no responders" in decision.reason


@pytest.mark.parametrize("limits", [UNLIMITED, daemon_limit(1), server_limit(1), Limits(2, 3)], ids=str)
@pytest.mark.parametrize("num_delivered", [1, 2, 3, 7])
@pytest.mark.parametrize(
    "outcome",
    [
        RetryableError("down"),
        KeyError("bug"),
        ShuttingDown(),
        CopyFailed("down"),
        PermanentError(ErrorClass.NOT_FOUND, "gone"),
    ],
    ids=type,
)
def test_no_decision_leaves_a_message_the_server_will_not_deliver_again(outcome, num_delivered, limits):
    """Nothing is lost: on the consumer's last delivery, a nak is never the answer."""
    decision = decide(outcome, num_delivered, limits, BACKOFF)
    if limits.is_last_delivery(num_delivered):
        assert not isinstance(decision, Nak), decision


# ---- backoff_delay -------------------------------------------------------------------------------


def test_backoff_first_delivery_gets_the_first_delay():
    assert backoff_delay(BACKOFF, 1) == 2.0


def test_backoff_steps_through_the_list():
    assert [backoff_delay(BACKOFF, n) for n in range(1, 6)] == list(BACKOFF)


def test_backoff_last_delay_repeats():
    assert backoff_delay(BACKOFF, 6) == backoff_delay(BACKOFF, 1000) == 300.0


def test_backoff_with_a_single_delay_always_uses_it():
    assert [backoff_delay((0.2,), n) for n in (1, 2, 3)] == [0.2, 0.2, 0.2]


def test_backoff_for_a_zero_delivery_count_uses_the_first_delay():
    assert backoff_delay(BACKOFF, 0) == 2.0


def test_an_upload_over_a_limit_on_its_work_is_dead_lettered_at_once_naming_the_variable():
    outcome = ResourceLimit("VIDEO_CPU_LIMIT", "video: ffmpeg used VIDEO_CPU_LIMIT (60s of CPU time)")
    assert decide(outcome, 1, UNLIMITED, BACKOFF) == DeadLetter(
        ErrorClass.RESOURCE_LIMIT, "video: ffmpeg used VIDEO_CPU_LIMIT (60s of CPU time)"
    )


def timed_out(timeouts: int | None, retries: int = 2) -> ProcessorTimeout:
    outcome = ProcessorTimeout("TRANSCODE_TIMEOUT", "transcode: ffmpeg did not finish within TRANSCODE_TIMEOUT (10m)")
    outcome.step, outcome.timeouts, outcome.retries = "transcode", timeouts, retries
    return outcome


@pytest.mark.parametrize("timeouts", [1, 2])
def test_a_step_that_timed_out_is_retried_up_to_processor_timeout_retries(timeouts):
    decision = decide(timed_out(timeouts), 7, UNLIMITED, BACKOFF)
    assert decision == Nak(300.0, "transcode: ffmpeg did not finish within TRANSCODE_TIMEOUT (10m)")


def test_a_step_that_timed_out_once_more_than_it_may_be_retried_is_dead_lettered_processor_timeout():
    assert decide(timed_out(3), 3, UNLIMITED, BACKOFF) == DeadLetter(
        ErrorClass.PROCESSOR_TIMEOUT,
        "transcode: ffmpeg did not finish within TRANSCODE_TIMEOUT (10m); step transcode timed out 3 times "
        "on this upload (PROCESSOR_TIMEOUT_RETRIES=2)",
    )


def test_with_no_timeout_retries_the_first_timeout_is_dead_lettered():
    assert isinstance(decide(timed_out(1, retries=0), 1, UNLIMITED, BACKOFF), DeadLetter)


def test_a_timeout_not_counted_is_retried_as_any_transient_failure():
    assert isinstance(decide(timed_out(None), 9, UNLIMITED, BACKOFF), Nak)
    assert decide(timed_out(1), 5, daemon_limit(5), BACKOFF).error_class is ErrorClass.MAX_DELIVERIES
