"""TextStream: token bytes in, whole characters out, stop strings never emitted."""

from __future__ import annotations

from inferno.plugins.backends.streaming import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(piece) for piece in pieces]


def test_text_without_stops_passes_straight_through() -> None:
    stream = TextStream()
    assert feed_all(stream, [b"Hello", b", ", b"world"]) == ["Hello", ", ", "world"]
    assert stream.flush() == ""
    assert not stream.stopped


def test_a_two_byte_character_split_over_two_feeds_comes_out_whole() -> None:
    stream = TextStream()
    assert feed_all(stream, [b"caf", "é".encode()[:1], "é".encode()[1:]]) == ["caf", "", "é"]


def test_a_four_byte_emoji_fed_one_byte_at_a_time_comes_out_once_and_whole() -> None:
    stream = TextStream()
    emoji = "🦩".encode()
    assert feed_all(stream, [emoji[i:i + 1] for i in range(4)]) == ["", "", "", "🦩"]


def test_a_cjk_character_split_across_feeds_that_also_carry_other_text() -> None:
    stream = TextStream()
    tokyo = "東京".encode()  # two three-byte characters
    assert feed_all(stream, [b"in " + tokyo[:2], tokyo[2:4], tokyo[4:] + b"!"]) == [
        "in ", "東", "京!"]


def test_invalid_bytes_become_the_replacement_character_instead_of_an_error() -> None:
    stream = TextStream()
    assert stream.feed(b"\xff") == "\ufffd"


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement() -> None:
    stream = TextStream()
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.flush() == "\ufffd"


def test_a_stop_string_inside_one_feed_ends_the_text_before_it() -> None:
    stream = TextStream(["STOP"])
    assert stream.feed(b"done STOP and more") == "done "
    assert stream.stopped
    assert stream.feed(b"ignored") == ""
    assert stream.flush() == ""


def test_a_stop_string_split_across_feeds_is_never_emitted() -> None:
    stream = TextStream(["France."])
    pieces = feed_all(stream, [b" the", b" capital", b" of", b" Fr", b"an", b"ce", b".", b" It"])
    assert "".join(pieces) == " the capital of "
    assert stream.stopped


def test_text_held_back_as_a_possible_stop_is_released_when_it_turns_out_not_to_be() -> None:
    stream = TextStream(["abc"])
    assert stream.feed(b"xa") == "x"
    assert stream.feed(b"b") == ""
    assert stream.feed(b"d") == "abd"
    assert not stream.stopped


def test_held_back_text_comes_out_at_the_end_of_generation() -> None:
    stream = TextStream(["abc"])
    assert stream.feed(b"xab") == "x"
    assert stream.flush() == "ab"


def test_a_stop_string_with_a_multi_byte_character_split_over_feeds() -> None:
    stream = TextStream(["→ end"])
    arrow = "→".encode()
    pieces = feed_all(stream, [b"go ", arrow[:1], arrow[1:], b" e", b"nd", b" never"])
    assert "".join(pieces) == "go "
    assert stream.stopped


def test_of_several_stop_strings_the_earliest_in_the_text_wins() -> None:
    stream = TextStream(["world", "lo"])
    assert stream.feed(b"hello world") == "hel"
    assert stream.stopped


def test_a_stop_string_that_is_a_prefix_of_another_stops_the_text() -> None:
    stream = TextStream(["\n\n", "\n\nUser:"])
    assert feed_all(stream, [b"answer", b"\n", b"\n"]) == ["answer", "", ""]
    assert stream.stopped
