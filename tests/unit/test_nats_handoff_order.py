"""The order of the NATS publisher's hand-off (backends/nats.py ``_whole_first``): frames of one
message go before fragmented frames of other subjects, and nothing passes what was handed over
before it on its subject or by its thread."""
from __future__ import annotations

import itertools
from typing import Any, List, Tuple

import pytest

pytest.importorskip("nats")
from msight_fast.backends import nats as N  # noqa: E402

_threads = itertools.count(1000)      # each frame from a thread of its own unless a test says otherwise


def _whole(subject: str, tag: str) -> Tuple[str, Any, None, N._Sent]:
    rec = N._Sent()
    rec.thread = next(_threads)
    return (subject, tag.encode(), None, rec)


def _frag(subject: str, count: int) -> List[Tuple[str, Any, None, N._Sent]]:
    pieces, rec = N._Pieces(iter(())), N._Sent(wait=True, items=count)
    rec.thread = next(_threads)
    return [(subject, pieces, None, rec)] * count


def _names(items: List[Any]) -> List[str]:
    return [f"{s}:{d.decode()}" if isinstance(d, bytes) else f"{s}:frag" for s, d, _, _ in items]


def test_one_message_frames_go_first_each_part_in_its_own_order() -> None:
    q = [*_frag("cam1", 2), _whole("jpeg", "1"), *_frag("cam2", 2), _whole("jpeg", "2"), _whole("imu", "1")]
    assert _names(N._whole_first(q, [])) == ["jpeg:1", "jpeg:2", "imu:1", "cam1:frag", "cam1:frag",
                                             "cam2:frag", "cam2:frag"]


def test_on_one_subject_nothing_passes_what_was_handed_over_before_it() -> None:
    q = [*_frag("cam", 2), _whole("cam", "small"), _whole("jpeg", "1")]
    assert _names(N._whole_first(q, [])) == ["jpeg:1", "cam:frag", "cam:frag", "cam:small"]


def test_a_batch_being_written_is_passed_by_other_subjects_only() -> None:
    ahead = [*_frag("cam1", 2), _whole("cam1", "held")]
    q = [_whole("cam1", "later"), _whole("jpeg", "1"), *_frag("cam2", 1)]
    assert _names(N._whole_first(q, ahead)) == ["jpeg:1", "cam1:frag", "cam1:frag", "cam1:held", "cam1:later",
                                                "cam2:frag"]


def test_nothing_passes_what_its_own_thread_handed_over_before() -> None:
    ahead = _frag("cam1", 2)
    held = _whole("cam1", "held")           # on the long frame's subject: waits behind it
    later = _whole("jpeg", "same-thread")   # by the thread that handed over the held frame
    other = _whole("imu", "other-thread")
    held[3].thread = later[3].thread = 1
    other[3].thread = 2
    ahead[0][3].thread = 3
    assert _names(N._whole_first([held, later, other], ahead)) == ["imu:other-thread", "cam1:frag", "cam1:frag",
                                                                   "cam1:held", "jpeg:same-thread"]
    first, last = N._split([held, later, other], ahead)
    assert _names(first) == ["imu:other-thread"] and _names(last) == ["cam1:held", "jpeg:same-thread"]


def test_nothing_to_pass_keeps_the_order_as_it_was() -> None:
    ahead = _frag("cam1", 3)
    q = [*_frag("cam2", 2), _whole("cam1", "x")]
    assert N._whole_first(q, ahead) == ahead + q


def test_with_no_fragmented_frame_a_batch_keeps_its_order() -> None:
    """What lets the hand-off copy a batch with no fragmented frame as it is."""
    q = [_whole("cam1", "1"), _whole("jpeg", "1"), _whole("cam1", "2"), _whole("imu", "1")]
    assert N._whole_first(q, []) == q
    first, last = N._split(q, [])
    assert first == q and last == []
