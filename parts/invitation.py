"""The invitation for a projector (GET /invite): the chat's link and its QR code, large.

Guarantees: the QR code is an SVG drawn dark on light whatever the screen's theme, with its
quiet zone, and encodes the link exactly; the link shows escaped; the page runs no script (its
Content-Security-Policy allows only its own inline style); a link that works only on this
machine says so.
"""

import html

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
