"""The workshop room on a projector: the QR code printed in the terminal reads right on light
and dark terminals, and GET /invite shows the link and its QR code, large, to those with the
room key. Each QR code is decoded as it is drawn (zxing-cpp), never inverted back."""

import base64
import re

from parts import invitation

# isort: split
import pytest
import zxingcpp  # requirements-test.txt

from tests.helpers import request, running_servers

LINK = "http://192.168.1.23:8000/?key=Workshop-Room-Key-1234"
KEY = "Workshop-Room-Key-1234"
PIXELS = 4  # per module, in the images handed to the decoder

# What the printed characters show: a cell's upper and lower half in the foreground colour
# (the block characters) or the background colour; colours as the escape codes set them.
HALVES = {
    " ": (False, False),
    "\u2580": (True, False),
    "\u2584": (False, True),
    "\u2588": (True, True),
}
FOREGROUND = {"30": 0, "37": 255, "97": 255}
BACKGROUND = {"40": 0, "47": 255, "107": 255}


def terminal_image(text, foreground, background):
    """The printed lines as a terminal with these default colours shows them: grey levels,
    PIXELS to a module, one row of pixels per list."""
    image = []
    for line in text.splitlines():
        colours = [foreground, background]
        cells = []
        for part in re.split(r"(\x1b\[[\d;]*m)", line):
            if part.startswith("\x1b["):
                for code in part[2:-1].split(";"):
                    if code in ("", "0"):
                        colours = [foreground, background]
                    elif code in FOREGROUND:
                        colours[0] = FOREGROUND[code]
                    else:
                        colours[1] = BACKGROUND[code]  # a code not known here: a KeyError
                continue
            for character in part:
                upper, lower = HALVES[character]
                cells.append((colours[0 if upper else 1], colours[0 if lower else 1]))
        for half in (0, 1):
            row = [cell[half] for cell in cells for _ in range(PIXELS)]
            image += [row] * PIXELS
    return image


def decoded(image):
    """The text of the one QR code in a grey image, or None; inverted codes are not read."""
    height, width = len(image), len(image[0])
    assert all(len(row) == width for row in image), "the lines differ in length"
    pixels = memoryview(bytes(value for row in image for value in row)).cast("B", (height, width))
    found = zxingcpp.read_barcode(pixels, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=False)
    return found.text if found else None


@pytest.mark.parametrize(("foreground", "background"), [(0, 255), (255, 0)], ids=["light", "dark"])
def test_the_printed_qr_code_reads_right_on_a_light_and_a_dark_terminal(
    capsys, foreground, background
):
    invitation.print_qr_code(LINK)
    printed = capsys.readouterr().out
    image = terminal_image(printed, foreground, background)
    assert decoded(image) == LINK
    # a quiet zone of 4 light modules (2 lines) above, as the scanner needs
    assert all(value == 255 for row in image[: 4 * PIXELS] for value in row)


def test_the_chat_prints_where_its_invitation_is(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", f"--key={KEY}")
    process.urls()
    line = process.lines.get(timeout=5)
    assert (
        line
        == f"Invitation: http://127.0.0.1:{process.port}/invite?key={KEY} (for the projector)\n"
    )


def test_invite_without_the_key_is_a_401_page_that_says_how_to_get_in(chat_process):
    process = chat_process("--port", "0", "--ws-port", "0", f"--key={KEY}")
    process.urls()
    status, content_type, body = request(process.port, "GET", "/invite")
    assert (status, content_type) == (401, "text/html; charset=utf-8")
    assert "needs its room key" in body.decode()
    assert KEY not in body.decode()


def test_invite_with_the_key_shows_the_link_and_a_qr_code_of_it_on_the_projector(
    chat_process,
    open_page,
):
    from playwright.sync_api import expect

    process = chat_process("--port", "0", "--ws-port", "0", f"--key={KEY}")
    process.urls()
    link = f"http://127.0.0.1:{process.port}/?key={KEY}"
    # the printed link, as the projector's browser opens it: the key goes into a cookie
    page = open_page(url=f"http://127.0.0.1:{process.port}/invite?key={KEY}", online=False)
    expect(page.get_by_role("heading")).to_have_text("Join the chat")
    expect(page.get_by_role("link")).to_have_text(link)
    assert page.url == f"http://127.0.0.1:{process.port}/invite"  # not the key in the address bar
    qr_code = page.locator("svg")
    box = qr_code.bounding_box()
    assert box["width"] >= 0.6 * page.viewport_size["height"]  # large: read from the back
    # The SVG as served, drawn by the browser (its canvas) and handed to the decoder.
    svg = qr_code.evaluate("svg => new XMLSerializer().serializeToString(svg)")
    drawing = page.context.new_page()  # a blank page: the invitation's CSP allows no script
    drawing.set_content(
        f'<img width="400" height="400" src="data:image/svg+xml;base64,'
        f'{base64.b64encode(svg.encode()).decode()}">'
    )
    image = drawing.evaluate(
        """async () => {
        const img = document.querySelector("img");
        await img.decode();
        const canvas = new OffscreenCanvas(img.width, img.height);
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0, img.width, img.height);
        const {data} = context.getImageData(0, 0, img.width, img.height);
        const rows = [];
        for (let y = 0; y < img.height; y++) {
            const row = [];
            for (let x = 0; x < img.width; x++) row.push(data[4 * (y * img.width + x)]);
            rows.push(row);
        }
        return rows;
    }"""
    )
    assert decoded(image) == link


def test_invite_with_the_key_as_a_bearer_is_a_page_without_script_for_its_own_host_only(
    chat_process,
):
    process = chat_process("--port", "0", "--ws-port", "0", f"--key={KEY}")
    process.urls()
    with_key = {"Authorization": f"Bearer {KEY}"}
    answer = request(process.port, "GET", "/invite", headers=with_key)
    assert (answer.status, answer.content_type) == (200, "text/html; charset=utf-8")
    policy = answer.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'; ") and "script-src" not in policy
    assert answer.body.count(b"<svg") == 1
    assert f"http://127.0.0.1:{process.port}/?key={KEY}".encode() in answer.body
    # the Host rules of every route: a name that is not this chat's is refused
    foreign = request(process.port, "GET", "/invite", headers={**with_key, "Host": "evil.example"})
    assert foreign.status == 403


def test_invite_needs_no_key_where_the_chat_needs_none_and_says_a_loopback_link_is_local(
    chat_process,
):
    process = chat_process("--port", "0", "--ws-port", "0")  # loopback: no room key
    process.urls()
    status, _, body = request(process.port, "GET", "/invite")
    assert status == 200
    assert f"http://127.0.0.1:{process.port}/<".encode() in body  # the link, without a key
    assert b"works only on this machine" in body


@pytest.mark.timeout(30)
def test_no_cache_keeps_the_invitation_or_the_answer_that_sets_the_key_cookie():
    with running_servers(key=KEY) as servers:
        invitation = request(
            servers.port, "GET", "/invite", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert invitation.status == 200 and KEY.encode() in invitation.body
        assert invitation.headers["Cache-Control"] == "no-store"
        for page in ("/invite", "/"):  # the printed links: the key goes into a cookie
            redirect = request(servers.port, "GET", f"{page}?key={KEY}")
            assert redirect.status == 303 and KEY in redirect.headers["Set-Cookie"]
            assert redirect.headers["Cache-Control"] == "no-store"
