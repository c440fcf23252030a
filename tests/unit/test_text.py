"""Stop strings over streamed text deltas."""

from __future__ import annotations

from tandem.formats.text import StopStringFilter


def _run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    f = StopStringFilter(stops)
    out = "".join(f.push(d) for d in deltas)
    return out + f.flush(), f.stopped


def test_stop_string_split_across_deltas() -> None:
    assert _run(["END"], ["abc E", "N", "D tail"]) == ("abc ", True)


def test_earliest_of_several_stops_wins() -> None:
    assert _run(["xyz", "\n\n"], ["one\n", "\ntwo xyz"]) == ("one", True)


def test_no_stop_passes_everything_through() -> None:
    assert _run(["STOP"], ["a", "bc", "ST", "OX"]) == ("abcSTOX", False)  # a held-back prefix is released
    assert _run([], ["a", "b"]) == ("ab", False)


def test_nothing_after_a_stop() -> None:
    f = StopStringFilter(["."])
    assert f.push("Hi. More") == "Hi" and f.push("text") == "" and f.flush() == ""
