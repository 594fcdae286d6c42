"""--watch reloads files that have stopped changing (server.files_settled): a file written in
parts was applied half-written whenever the part so far was valid on its own."""

from __future__ import annotations

from apigate.server import files_settled

APPLIED = (("apigate.yaml", 100.0, 500),)
HALF = (("apigate.yaml", 101.0, 200),)  # the first part of a copy
WHOLE = (("apigate.yaml", 102.0, 900),)
MISSING = (("apigate.yaml", 0.0, -1),)  # replaced by a rename: not there for a moment


def test_a_change_waits_one_look_for_the_files_to_stop_changing() -> None:
    assert not files_settled(APPLIED, APPLIED, HALF)  # first seen: not yet
    assert not files_settled(APPLIED, HALF, WHOLE)  # still being written
    assert files_settled(APPLIED, WHOLE, WHOLE)  # the same two looks in a row


def test_nothing_new_or_a_missing_main_file_is_no_reload() -> None:
    assert not files_settled(APPLIED, APPLIED, APPLIED)
    assert not files_settled(APPLIED, MISSING, MISSING)
