"""What a name may hold, and when two names are the same: rules taken from standards.

Guarantees:

- `checked(name)` returns the name as the room stores and shows it, or raises ValueError whose
  text says, for a person, why the name is not allowed. A name it returns:
  - is allowed by the PRECIS Nickname profile (RFC 8266), joiner rules included (RFC 5892,
    CONTEXTJ): no control, format, private-use, unassigned or noncharacter code point, and a
    zero width joiner or non-joiner only where a script needs it (Persian, Malayalam);
  - or holds such code points only inside an emoji sequence that Unicode recommends (RGI,
    UTS #51: flags of England, Scotland and Wales, keycaps, skin tones, ZWJ sequences such
    as 👩‍💻), which is kept whole, exactly as sent;
  - does not begin with a combining mark (a mark needs a letter to sit on; RFC 5891 4.2.3.2),
    has no more than 4 nonspacing marks in a row and never the same one twice in a row
    (UTS #39 5.4), and shows something: its skeleton is not empty;
  - is in its stored form: PRECIS enforcement, case preserved (NFKC, inner spaces as one
    U+0020), so "ｂｏｂ" is stored as "bob" and checking it again changes nothing.
- `same_name_key(name)` is equal for two names that look alike: "Bob", "BOB", "ｂｏｂ",
  "ВОВ" (Cyrillic) and "bob" have one key. It is UTS #39's confusable skeleton with case
  folding and NFKC, to a fixed point (disarm's skeleton_key). A key is for comparing, never
  for showing.

Why a package for each: a hand-kept list of characters let "bob" + U+FE0F pass as a second
"bob" and refused the flag of Wales; the standards' tables are kept by Unicode and the IETF.
"""

import unicodedata

import disarm
import emoji
import unicodedataplus
from precis_i18n import get_profile

NICKNAME = get_profile("NicknameCasePreserved")

# Stands in for each emoji sequence while PRECIS reads the rest: an allowed symbol that no
# rule changes, so every other character is judged in its real place (a joiner after an
# emoji is still refused). A name holding it itself is refused: the emoji could not be put
# back in their places.
STAND_IN = "\ufffc"  # OBJECT REPLACEMENT CHARACTER

# UTS #39 5.4 (optional detection): more nonspacing marks in a row than real writing needs
# pile up over the lines next to the name. Pointed Hebrew has 3 on one letter.
MAX_MARKS_IN_A_ROW = 4

# PRECIS's reasons for refusing a code point, as a person reads them.
REASONS = {
    "controls": "a control character",
    "precis_ignorable_properties": "a character that shows nothing, or a noncharacter",
    "unassigned": "a code point Unicode has not assigned",
    "old_hangul_jamo": "a Hangul filler or old jamo, which shows nothing alone",
    "zero_width_joiner": "a zero width joiner where no script needs one",
    "zero_width_nonjoiner": "a zero width non-joiner where no script needs one",
    "other": "a private-use, surrogate or noncharacter code point",
}


def checked(name):
    """The name as stored and shown, or ValueError saying why it is not allowed."""
    if STAND_IN in name:
        raise ValueError(f"name has {described(STAND_IN)}, which stands for a missing picture")
    text, emoji_sequences = emoji_set_aside(name)
    try:
        text = NICKNAME.enforce(text)
    except UnicodeEncodeError as error:
        raise ValueError(refusal(error, text)) from None
    check_marks(text)
    stored = emoji_put_back(text, emoji_sequences)
    if not same_name_key(stored):
        raise ValueError("name shows nothing: only characters that draw nothing")
    return stored


def same_name_key(name):
    """Equal for two names that look alike (UTS #39 skeleton, case folded, NFKC)."""
    return disarm.skeleton_key(name, digit_policy="tr39")


def emoji_set_aside(name):
    """The name with a STAND_IN for each emoji sequence Unicode recommends, and the sequences."""
    matches = [match for match in emoji.emoji_list(name) if is_rgi(match)]
    text, end = "", 0
    for match in matches:
        text += name[end : match["match_start"]] + STAND_IN
        end = match["match_end"]
    return text + name[end:], [match["emoji"] for match in matches]


def emoji_put_back(text, emoji_sequences):
    pieces = text.split(STAND_IN)
    return pieces[0] + "".join(
        sequence + piece for sequence, piece in zip(emoji_sequences, pieces[1:], strict=True)
    )


def is_rgi(match):
    """True for an emoji sequence Unicode recommends for general interchange (UTS #51)."""
    data = emoji.EMOJI_DATA.get(match["emoji"], {})
    return data.get("status") == emoji.STATUS["fully_qualified"]


def check_marks(text):
    """Marks sit on a letter of their own script, and do not pile up (RFC 5891, UTS #39)."""
    base, run = None, ""
    for c in unicodedata.normalize("NFD", text):
        if not unicodedata.category(c).startswith("M"):
            base, run = c, ""
            continue
        if base is None:
            raise ValueError("name begins with a combining mark, which has no letter to sit on")
        if not of_one_script(base, c):
            raise ValueError(
                f"name has a mark of another script on a letter ({described(c)} "
                f"after {described(base)}): it draws nothing there"
            )
        if unicodedata.category(c) == "Mc":  # a spacing mark takes room of its own
            continue
        if run.endswith(c):
            raise ValueError(f"name has the same mark twice in a row ({described(c)})")
        run += c
        if len(run) > MAX_MARKS_IN_A_ROW:
            raise ValueError(f"name has more than {MAX_MARKS_IN_A_ROW} combining marks in a row")


def of_one_script(base, mark):
    """False for a mark of one script on a letter of another: a Khitan filler after "bob".
    A mark shared by scripts (Inherited) or a base of no script (a digit, a symbol) is fine:
    a combining sequence takes the script of its base (Unicode Standard, UAX #24)."""
    neutral = {"Zinh", "Zyyy"}
    mark_scripts = set(unicodedataplus.script_extensions(mark))
    base_scripts = set(unicodedataplus.script_extensions(base))
    if unicodedataplus.script(mark) in ("Inherited", "Common") or base_scripts <= neutral:
        return True
    return bool(mark_scripts & base_scripts)


def refusal(error, text):
    """PRECIS's refusal (a UnicodeEncodeError) as the sentence a person reads, naming the
    character as it was typed (U+3164, not the U+1160 that NFKC made of it)."""
    reason = error.reason.removeprefix("DISALLOWED/")
    if error.start >= len(error.object):  # empty, or not the same when enforced twice
        return f"name is not allowed by the PRECIS nickname rules ({reason})"
    refused = error.object[error.start]
    c = next((c for c in text if refused in unicodedata.normalize("NFKC", c)), refused)
    category = unicodedata.category(c)
    if category in ("Cc", "Zl", "Zp"):
        return f"name has control characters ({described(c)})"
    if category == "Cf":
        why = "no script needs it there" if "joiner" in reason else "it hides or reorders text"
        return f"name has an invisible format character ({described(c)}): {why}"
    return f"name has {REASONS.get(reason, reason)} ({described(c)})"


def described(c):
    return f"U+{ord(c):04X}, {unicodedata.name(c, 'unnamed')}"
