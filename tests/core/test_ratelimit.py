"""Sliding windows for automatic mail (DESIGN.md, "Outbound mail and loop protection").

A window of ``seconds`` covers the half-open interval ``(now - seconds, now]``: a
mail sent exactly ``seconds`` ago no longer counts. One more mail is allowed
while every window holds fewer than ``limit`` mails.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from iqmaild.core.ratelimit import Window, allows, longest

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TEN_MINUTES = Window(600, 5)
DAY = Window(86_400, 20)
DEFAULT = (TEN_MINUTES, DAY)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def test_nothing_sent_is_allowed() -> None:
    assert allows([], NOW, DEFAULT)


def test_limit_minus_one_allowed_limit_reached_refused() -> None:
    assert allows([ago(1)] * 4, NOW, DEFAULT)
    assert not allows([ago(1)] * 5, NOW, DEFAULT)
    assert not allows([ago(1)] * 6, NOW, DEFAULT)


def test_window_boundary_is_exclusive_at_the_start() -> None:
    at_start = [ago(600)] * 5
    assert allows(at_start, NOW, DEFAULT), "sent exactly 10 minutes ago: expired"
    just_inside = [ago(599.999)] * 5
    assert not allows(just_inside, NOW, DEFAULT)
    assert allows([ago(600.001)] * 5, NOW, DEFAULT)


def test_sent_at_now_counts() -> None:
    assert not allows([NOW] * 5, NOW, DEFAULT)


def test_window_slides() -> None:
    sent = [ago(590), ago(400), ago(300), ago(200), ago(100)]
    assert not allows(sent, NOW, DEFAULT)
    assert allows(sent, NOW + timedelta(seconds=10), DEFAULT)  # the oldest left the window
    assert not allows(sent, NOW + timedelta(seconds=9), DEFAULT)


def test_every_window_must_have_room() -> None:
    # 20 mails spread over the day, none in the last 10 minutes: the day is full
    day = [ago(3600 * h + 700) for h in range(20)]
    assert not allows(day, NOW, DEFAULT)
    assert allows(day[:19], NOW, DEFAULT)
    assert allows(day, NOW, (TEN_MINUTES,))
    # the day window's boundary is exclusive too
    assert allows([ago(86_400)] * 20, NOW, DEFAULT)


def test_no_windows_means_no_limit() -> None:
    assert allows([NOW] * 1000, NOW, ())
    assert longest(()) == timedelta(0)


def test_zero_limit_refuses_everything() -> None:
    assert not allows([], NOW, (Window(600, 0),))


def test_future_timestamps_count() -> None:
    # clock skew between instances: a send recorded slightly ahead still counts
    assert not allows([NOW + timedelta(seconds=5)] * 5, NOW, DEFAULT)


def test_accepts_any_iterable_once() -> None:
    assert not allows(iter([ago(1)] * 5), NOW, DEFAULT)  # consumed once, used per window


def test_longest() -> None:
    assert longest(DEFAULT) == timedelta(days=1)
    assert longest([Window(5, 1)]) == timedelta(seconds=5)
    assert longest(iter(DEFAULT)) == timedelta(days=1)
