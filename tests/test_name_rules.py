"""What a name may hold, and when two names are the same: through the real server (HTTP posts,
websocket joins and renames) and, where that reads clearer, parts/names.py itself."""

import itertools
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parts import names
from tests.helpers import get, joined, post, receive, rename

ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
WALES = "\U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f"

# Each request from an address of its own: the rate limit and the name holding are per
# address, and these tests are not a flood.
addresses = (f"127.0.{40 + n // 250}.{1 + n % 250}" for n in itertools.count())


def posted_name(server, name):
    """A post under `name`: 201 and the name as the room stored it, or the status and the
    error that names the rule."""
    status, body = post(
        server.port, "/messages", {"name": name, "text": "hi"}, source=next(addresses)
    )
    return status, body.get("name") if status == 201 else body["errors"]["name"]


# --- Two names that look alike are one name ----------------------------------------------


@pytest.mark.parametrize(
    "lookalike",
    [
        "bob\u034f",  # a combining grapheme joiner, which draws nothing
        "bob\ufe0f",  # a variation selector on a letter
        "bob\u2065",  # unassigned
        "BOB",
        "\uff42\uff4f\uff42",  # fullwidth
        "\u0412\u041e\u0412",  # Cyrillic capitals: ВОВ
        "b\u043eb",  # a Cyrillic о between two Latin letters
        "b\u200cob",  # a zero width non-joiner between Latin letters
        "bob\u2800",  # a Braille blank after the name
    ],
)
def test_while_bob_is_online_no_second_bob_that_looks_the_same(server, lookalike):
    with joined(server, "127.0.0.1", name="bob") as (_, history):
        assert history["name"] == "bob"
        assert posted_name(server, lookalike)[0] in (400, 409)
        with joined(server, "127.0.0.2", name=lookalike) as (ws, history):
            assert history["name"].startswith("guest-")
            assert "error" in receive(ws, "error")
            rename(ws, lookalike)
            assert receive(ws, "error")["error"].startswith("rename refused: ")
    assert "bob" in history["online"] and lookalike not in history["online"]


@pytest.mark.parametrize(
    "latin, other",
    [
        ("alice", "\u0430lice"),  # Cyrillic а
        ("Bob", "\u0412\u043e\u0432"),  # Cyrillic Вов
        ("Bob", "\uff42\uff4f\uff42"),
        ("paypal", "\U0001d52d\U0001d51e\U0001d536\U0001d52d\U0001d51e\U0001d529"),  # Fraktur
        ("omega", "\u03bfmega"),  # Greek ο
    ],
)
def test_lookalikes_across_scripts_have_one_key(latin, other):
    assert names.same_name_key(names.checked(latin)) == names.same_name_key(names.checked(other))


def test_a_cyrillic_lookalike_of_a_name_held_online_is_taken(server):
    with joined(server, "127.0.0.1", name="alice"):
        status, error = posted_name(server, "\u0430lice")
    assert status == 409 and "is taken" in error


def test_names_that_look_different_stay_apart():
    assert names.same_name_key("bob") != names.same_name_key("rob")
    assert names.same_name_key("\u0628\u0627\u0628\u0627") != names.same_name_key(
        "\u0645\u0627\u0645\u0627"
    )


# --- What a name may hold -----------------------------------------------------------------


@pytest.mark.parametrize(
    "character",
    [
        *(chr(c) for c in (0xFE00, 0xFE0E, 0xFE0F, 0xE0100, 0xE01EF)),  # variation selectors
        *(chr(c) for c in range(0x180B, 0x1810)),  # Mongolian variation selectors, U+180E
        *(chr(c) for c in (0xFFF0, 0xFFF8, 0xE0080)),  # unassigned
        "\U00016fe4",  # the Khitan filler, which draws nothing after "bob"
        *(chr(c) for c in (0xE000, 0xF8FF, 0xF0000, 0x10FFFD)),  # private use
        "\uffff",  # a noncharacter
    ],
)
def test_characters_that_show_nothing_or_nothing_known_are_refused(server, character):
    status, error = posted_name(server, "bob" + character)
    assert status == 400 and f"U+{ord(character):04X}" in error
    with joined(server, next(addresses), name="bob" + character) as (ws, history):
        assert history["name"].startswith("guest-")
        assert f"U+{ord(character):04X}" in receive(ws, "error")["error"]


def test_a_name_of_blanks_that_are_no_white_space_shows_nothing_and_is_refused(server):
    status, error = posted_name(server, "\u2800\u2800")  # Braille blanks: symbols to PRECIS
    assert status == 400 and "shows nothing" in error


@pytest.mark.parametrize("flag", [ENGLAND, SCOTLAND, WALES])
def test_the_flags_of_england_scotland_and_wales_are_names(server, flag):
    assert posted_name(server, flag) == (201, flag)
    assert posted_name(server, f"Rhys {flag}") == (201, f"Rhys {flag}")
    with joined(server, next(addresses), name=flag) as (ws, history):
        assert history["name"] == flag
        rename(ws, f"{flag}{flag}")
        ws.send("hi")
        assert receive(ws, "message")["name"] == f"{flag}{flag}"


def test_an_emoji_tag_sequence_that_unicode_does_not_recommend_is_refused():
    # a black flag with the tags of "gbzzz": no such flag, and the tags draw nothing
    with pytest.raises(ValueError, match="U\\+E0067"):
        names.checked("\U0001f3f4\U000e0067\U000e0062\U000e007a\U000e007a\U000e007a\U000e007f")


def test_malayalam_typed_with_the_old_chillu_encoding_is_a_name(server):
    old = "\u0d05\u0d35\u0d28\u0d4d\u200d"  # അവന്‍: virama and a zero width joiner at the end
    assert posted_name(server, old) == (201, old)
    with joined(server, next(addresses), name=f"{old} \u0d15\u0d23\u0d4d\u200d") as (_, history):
        assert history["name"] == f"{old} \u0d15\u0d23\u0d4d\u200d"


def test_a_joiner_after_a_letter_with_no_virama_is_refused(server):
    status, error = posted_name(server, "\u0d05\u0d35\u0d28\u200d")  # CONTEXTJ: no virama
    assert status == 400 and "U+200D" in error


@pytest.mark.parametrize(
    "name, invisible",
    [
        (
            "\u1832\u1821\u1837\u182d\u180e\u1821",
            "\u180e",
        ),  # Mongolian "terge", its vowel separator
        ("\u1781\u17d2\u1798\u17c2\u179a\u200b\u1797\u17b6\u179f\u17b6", "\u200b"),  # Khmer
    ],
)
def test_mongolian_and_khmer_take_no_invisible_separator_but_are_names_without(
    server, name, invisible
):
    status, error = posted_name(server, name)
    assert status == 400 and f"U+{ord(invisible):04X}" in error
    without = name.replace(invisible, "")
    assert posted_name(server, without) == (201, without)


@pytest.mark.parametrize(
    "name",
    [
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian: a non-joiner in the word
        "\U0001f469\u200d\U0001f4bb",  # 👩‍💻
        "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22",  # Thai
        "\u05e9\u05bc\u05c1\u05b8\u05dc\u05d5\u05b9\u05dd",  # Hebrew with points
        "\u0623\u062d\u0645\u062f",  # Arabic
        "\u674e\u5c0f\u9f8d",  # CJK
        "\U0001f44b\U0001f3fd",  # an emoji with a skin tone
        "\U0001f469\U0001f3ff\u200d\U0001f4bb",  # and a ZWJ sequence with one
        "1\ufe0f\u20e3",  # a keycap
        "\U0001f1eb\U0001f1f7",  # a flag of two regional indicators
        "Nguy\u1ec5n",
        "\u0928\u092e\u0938\u094d\u0924\u0947",  # Devanagari
        "guest-7",
    ],
)
def test_names_in_real_writing_and_emoji_are_shown_as_typed(server, name):
    stored = unicodedata.normalize("NFC", name)  # pointed Hebrew: its marks in Unicode's order
    assert posted_name(server, name) == (201, stored)
    with joined(server, next(addresses), name=name) as (ws, history):
        assert history["name"] == stored
        ws.send("hi")
        assert receive(ws, "message")["name"] == stored


def test_a_compatibility_form_is_stored_in_its_plain_form(server):
    assert posted_name(server, "\uff22\uff4f\uff42") == (201, "Bob")  # case kept
    assert posted_name(server, "a\u3000\u3000b") == (201, "a b")


def test_a_name_that_nfkc_makes_longer_than_32_characters_is_refused(server):
    status, error = posted_name(server, "\ufdfa\ufdfa")  # 2 characters, 36 once NFKC
    assert status == 400 and "longer than 32" in error


# --- Any name: an answer, and what is stored is what is shown -----------------------------

interesting = st.sampled_from(
    [
        "\u200c", "\u200d", "\ufe0f", "\u20e3", "\u0301", "\u0d4d", "\u034f", "\U000e0067",
        "\U000e007f", "\U0001f3f4", "\U0001f469", "\U0001f3fd", "\u3000", " ", "\ufdfa",
        "\u2800", "\U00016fe4", "\ufffc", ENGLAND, "a", "\u0430",
    ]
)  # fmt: skip
any_name = st.lists(interesting | st.characters(), min_size=1, max_size=36).map("".join)


@settings(max_examples=2000, deadline=None, database=None)
@given(any_name)
def test_a_name_checked_is_checked_again_unchanged(name):
    try:
        stored = names.checked(name)
    except ValueError as refusal:
        assert str(refusal).startswith("name ")
        return
    assert names.checked(stored) == stored
    assert names.same_name_key(stored)


def test_any_name_gets_an_answer_and_is_shown_back_as_stored(server):
    @settings(max_examples=150, deadline=None, database=None)
    @given(any_name)
    def check(name):
        status, message = post(
            server.port, "/messages", {"name": name, "text": "hi"}, source=next(addresses)
        )
        assert status in (201, 400), message
        if status == 201:
            stored = message["name"]
            assert 1 <= len(stored) <= 32
            kept = get(server.port, f"/messages?since={message['id'] - 1}&limit=1")[1]["messages"]
            assert [m["name"] for m in kept] == [stored]
            assert posted_name(server, stored) == (201, stored)

    check()
    assert get(server.port, "/health")[0] == 200
