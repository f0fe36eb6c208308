"""The order of the NATS publisher's hand-off (backends/nats.py ``_whole_first``): frames of one
message go before fragmented frames of other subjects, and on one subject nothing passes what was
handed over before it."""
from __future__ import annotations

from typing import Any, List, Tuple

import pytest

pytest.importorskip("nats")
from msight_fast.backends import nats as N  # noqa: E402


def _whole(subject: str, tag: str) -> Tuple[str, Any, None, N._Sent]:
    return (subject, tag.encode(), None, N._Sent())


def _frag(subject: str, count: int) -> List[Tuple[str, Any, None, N._Sent]]:
    pieces, rec = N._Pieces(iter(())), N._Sent(wait=True, items=count)
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


def test_nothing_to_pass_keeps_the_order_as_it_was() -> None:
    ahead = _frag("cam1", 3)
    q = [*_frag("cam2", 2), _whole("cam1", "x")]
    assert N._whole_first(q, ahead) == ahead + q
