"""The invitation for a projector (GET /invite): the chat's link and its QR code, large.

Guarantees: the QR code is an SVG drawn dark on light whatever the screen's theme, with its
quiet zone, and encodes the link exactly; the link shows escaped; the page runs no script (its
Content-Security-Policy allows only its own inline style); a link that works only on this
machine says so.
"""

import contextlib
import html
import ipaddress
import socket

import segno

from parts.access import inline_hashes

INVITATION = """<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat: join in</title>
<style>
body {{ margin: 0; min-height: 100dvh; display: grid; place-content: center; gap: 2vmin;
       background: #fff; color: #000; font: 4vmin/1.3 system-ui, sans-serif; text-align: center; }}
h1 {{ margin: 0; font-size: 1.4em; }}
p {{ margin: 0; overflow-wrap: anywhere; }}
svg {{ width: 70vmin; height: 70vmin; margin: auto; }}
.only-here {{ color: #b91c1c; font-size: .7em; }}
</style>
<h1>Join the chat</h1>
{qr_code}
<p>Scan the code, or open <a href="{link}">{link}</a></p>
{warning}
</html>
"""


def invitation(link, only_here):
    """The invitation's HTML. make_qr(), not make(): a short link would get a Micro QR code,
    which phone cameras often do not read."""
    qr_code = segno.make_qr(link).svg_inline(
        omitsize=True, dark="#000", light="#fff", title="The chat's link as a QR code"
    )
    warning = (
        '<p class="only-here">This address works only on this machine: open the invitation '
        "at the address the chat printed.</p>"
        if only_here
        else ""
    )
    return INVITATION.format(qr_code=qr_code, link=html.escape(link), warning=warning)


def invitation_policy(invitation_html):
    """No script at all: only the invitation's own inline style."""
    return (
        f"default-src 'none'; style-src {inline_hashes(invitation_html, 'style')}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


# --- The addresses and the QR code chat.py prints at start ------------------------------


def reachable_addresses(host):
    """The addresses to print for --host: 0.0.0.0 (or ::) is every address, and nobody can open it.

    So print this machine's own addresses, loopback last (it works only here): the one its
    default route leaves from (connecting a UDP socket sends nothing, it only picks the
    route) and the ones its host name resolves to.
    """
    if host not in ("0.0.0.0", "::"):
        return [host]
    family, somewhere, loopback = (
        (socket.AF_INET, "198.51.100.1", "127.0.0.1")
        if host == "0.0.0.0"
        else (socket.AF_INET6, "2001:db8::1", "::1")
    )
    found = []
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((somewhere, 9))  # a documentation address: any routed one would do
        found.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, family)]
    lan = [
        address for address in found if not ipaddress.ip_address(address.split("%")[0]).is_loopback
    ]
    return [*dict.fromkeys(lan), loopback]


def print_qr_code(url):
    """The first page URL as a QR code, for phones (see qr_code_lines()). A terminal that
    cannot show the blocks gets no QR code."""
    with contextlib.suppress(UnicodeEncodeError):
        print("\n".join(qr_code_lines(url)), flush=True)


BLOCKS = {(0, 0): " ", (1, 0): "\u2580", (0, 1): "\u2584", (1, 1): "\u2588"}  # dark (top, bottom)
BLACK_ON_WHITE, RESET = "\033[30;107m", "\033[0m"


def qr_code_lines(url):
    """A QR code of `url` for a terminal: half blocks, two rows of modules a line.

    The dark modules are the drawn ones, in black on a white background, with a quiet zone
    of 4 modules around: right on a dark terminal, a light one and a projector alike.
    (segno's own terminal output draws in the terminal's colours: inverted on one of them.)
    make_qr(), not make(): make() picks a Micro QR code for short texts, which phone cameras
    often do not read.
    """
    rows = [list(row) for row in segno.make_qr(url).matrix_iter(border=4)]
    rows.append([0] * len(rows[0]))  # an odd count of rows: the last line's lower half is light
    return [
        BLACK_ON_WHITE + "".join(BLOCKS[pair] for pair in zip(top, bottom, strict=True)) + RESET
        for top, bottom in zip(rows[::2], rows[1::2], strict=True)
    ]
