"""Names belong to people: what a name may hold, and when two names are the same.

Guarantees: check_shown() refuses (BadInput, saying why) a name that hides what it is: control
and format characters (but a joiner inside a word), a name that draws nothing, a pile of
combining marks. name_key() gives two names the same key exactly when people would read them as
one name ("Bob", "BOB", "ｂｏｂ"). Both are pure functions.
"""

import unicodedata

from parts.errors import BadInput

# Format characters (Unicode Cf) draw nothing and change how what follows them is drawn:
# U+202E reverses the rest of the line, U+200B is a name of nothing. Only the joiners stay,
# inside a word: Persian needs U+200C, emoji such as 👩‍💻 need U+200D.
JOINERS = "\u200c\u200d"
# Draw nothing, though Unicode does not call them format characters: fillers and a blank,
# which make "bob" and "bob\u3164" two names that look the same.
BLANKS = "\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5"
# Combining marks pile up above or below the letter before them: 31 drew over the messages
# next to the name. A few in a row are real writing, after NFC: Thai needs 2, pointed
# Hebrew and Tibetan stacks 3.
MAX_MARKS = 3


def check_shown(name):
    """A trimmed name that shows what it is: no control or format characters, something
    visible, no pile of combining marks; else BadInput."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        raise BadInput("name has control characters")  # a newline in the online list helps nobody
    check_format_characters(name)
    if all(is_invisible(c) for c in name):
        raise BadInput("name shows nothing: it has only white space, invisible or combining marks")
    if longest_run_of_marks(name) > MAX_MARKS:
        raise BadInput(f"name has more than {MAX_MARKS} combining marks in a row")


def check_format_characters(name):
    for i, c in enumerate(name):
        if unicodedata.category(c) != "Cf" and c not in BLANKS:
            continue
        inside_a_word = 0 < i < len(name) - 1 and not any(
            n.isspace() or unicodedata.category(n) == "Cf" for n in (name[i - 1], name[i + 1])
        )
        if c not in JOINERS or not inside_a_word:
            raise BadInput(
                f"name has an invisible format character (U+{ord(c):04X}, "
                f"{unicodedata.name(c, 'unnamed')}): bidi controls and the like are not allowed"
            )


def is_invisible(c):
    """True if the character draws nothing by itself (a mark needs a letter to sit on)."""
    return c.isspace() or unicodedata.category(c) in ("Cf", "Mn", "Me", "Mc")


def longest_run_of_marks(name):
    run = longest = 0
    for c in name:
        run = run + 1 if unicodedata.category(c) in ("Mn", "Me") else 0
        longest = max(longest, run)
    return longest


def name_key(name):
    """What makes two names the same name to people: "Bob", "BOB" and "ｂｏｂ" are one,
    and so are "bob" and "b\u200cob" (a joiner shows nothing between two letters)."""
    return unicodedata.normalize("NFKC", name).casefold().translate({ord(c): None for c in JOINERS})
