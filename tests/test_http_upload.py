"""XEP-0363 HTTP File Upload against a real server: slixmpp's xep_0363
upload then a GET of the same bytes over real TLS, the slot service's
disco and errors (too large, quota, rate, bad names, strangers), the PUT
refusals (too large, tampered, expired, reused, wrong type), path
traversal, a stalled upload, the clean-up of expired files, and a PUT
landing on the other shard of a two-shard server."""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import re
import socket
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import slixmpp

from mlink.modules.http_upload.ranges import Unsatisfiable, byte_range
from mlink.modules.http_upload.slots import (
    Slot,
    owner_id,
    parse_authorization,
    parse_path,
    verify,
)
from mlink.modules.http_upload.storage import (
    KEY_FILE,
    STALE_PART_SECONDS,
    Meta,
    UploadStore,
)
from tests.placement import Placement
from tests.rawclient import RawClient, read_stanza, stanza_error_of
from tests.serverproc import MlinkProcess, mlink, serve, start_mlink, stop

DOMAIN = "localhost"
UPLOAD = f"upload.{DOMAIN}"
NS = "urn:xmpp:http:upload:0"
PASSWORD = "upload-secret"
# A second served domain, whose users may use its upload service only.
OTHER = "example.com"
USERS = {f"{name}@{DOMAIN}": PASSWORD for name in
         ("alice", "bob", "carol", "dave", "erin", "frank", "heidi", "ivan")} | {f"grace@{OTHER}": PASSWORD}
MAX_SIZE = 100_000
QUOTA = 250_000
IDLE = 2
RATE = 30
MODULE = (f'<modules><module name="http_upload"><max-file-size>{MAX_SIZE}</max-file-size>'
          f"<quota>{QUOTA}</quota><slots-per-minute>{RATE}</slots-per-minute>"
          f"<idle-timeout>{IDLE}</idle-timeout></module></modules>")
# A reply on loopback takes milliseconds; this bounds a hung one.
TIMEOUT = 10.0


def add_module(text: str) -> str:
    text = text.replace(f"<domain>{DOMAIN}</domain>",
                        f"<domain>{DOMAIN}</domain><domain>{OTHER}</domain>", 1)
    return text.replace("<data ", MODULE + "\n  <data ", 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           cert_files: tuple[Path, Path]) -> Iterator[MlinkProcess]:
    setup = tmp_path_factory.mktemp("upload") / "s"
    with start_mlink(setup, DOMAIN, cert_files, users=USERS, edit_config=add_module) as p:
        yield p


def https_port(server: MlinkProcess) -> int:
    return int(server.wait_for_log(r"listening for websocket-tls .* port (\d+)").group(1))


def data_dir(server: MlinkProcess) -> Path:
    return server.config.parent


# -- XMPP helpers ----------------------------------------------------------------------


def login(server: MlinkProcess, ca_file: Path, user: str) -> RawClient:
    client = RawClient(server.c2s_port, ca_file)
    client.login(DOMAIN, user, PASSWORD, resource="r-" + uuid.uuid4().hex[:8])
    return client


def iq(client: RawClient, to: str, payload: str) -> ET.Element:
    stanza_id = "u-" + uuid.uuid4().hex[:8]
    client.send(f"<iq type='get' id='{stanza_id}' to='{to}'>{payload}</iq>")
    return read_stanza(client, "iq", stanza_id)


def request_slot(client: RawClient, filename: str, size: int | str,
                 content_type: str | None = "application/octet-stream") -> ET.Element:
    attrs = f" filename='{filename}' size='{size}'"
    if content_type is not None:
        attrs += f" content-type='{content_type}'"
    return iq(client, UPLOAD, f"<request xmlns='{NS}'{attrs}/>")


def slot_of(reply: ET.Element) -> tuple[str, str, str]:
    """(put URL, Authorization header, get URL) of a slot result."""
    assert reply.get("type") == "result", ET.tostring(reply)
    put = reply.find(f"{{{NS}}}slot/{{{NS}}}put")
    get = reply.find(f"{{{NS}}}slot/{{{NS}}}get")
    assert put is not None and get is not None, ET.tostring(reply)
    header = put.find(f"{{{NS}}}header")
    assert header is not None and header.get("name") == "Authorization"
    return put.get("url", ""), header.text or "", get.get("url", "")


# -- HTTP helpers ----------------------------------------------------------------------


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def fetch(ca_file: Path, url: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                       context=tls_context(ca_file), timeout=TIMEOUT)
    try:
        conn.request(method, parts.path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def put(ca_file: Path, url: str, auth: str, data: bytes,
        content_type: str = "application/octet-stream") -> int:
    return fetch(ca_file, url, "PUT", data, {"Authorization": auth,
                                            "Content-Type": content_type})[0]


def upload(server: MlinkProcess, ca_file: Path, client: RawClient, data: bytes,
           name: str = "file.bin") -> str:
    """Request a slot and PUT `data`; the GET URL."""
    put_url, auth, get_url = slot_of(request_slot(client, name, len(data)))
    assert put(ca_file, put_url, auth, data) == 201
    return get_url


def raw_tls(port: int, ca_file: Path) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return tls_context(ca_file).wrap_socket(sock, server_hostname="localhost")


def read_response(sock: ssl.SSLSocket) -> bytes:
    """One whole response (head and Content-Length bytes of body); the
    server may keep the connection a moment to drop what it refused, so
    its close is not what ends the response."""
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# -- a real client ---------------------------------------------------------------------


def slixmpp_upload(server: MlinkProcess, ca_file: Path, user: str, data: bytes,
                   filename: str, content_type: str) -> str:
    """Log in with slixmpp and upload with its xep_0363 plugin (aiohttp);
    the GET URL it returns."""
    import aiohttp.connector

    # aiohttp verifies with one default context built at import: make it
    # trust the test CA as well (the server's certificate is the test CA's).
    aiohttp.connector._SSL_CONTEXT_VERIFIED.load_verify_locations(cafile=str(ca_file))

    async def run() -> str:
        client = slixmpp.ClientXMPP(user, PASSWORD)
        client.register_plugin("xep_0030")
        client.register_plugin("xep_0363")
        client.ssl_context = tls_context(ca_file)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_start(_event: object) -> None:
            try:
                url = await client.plugin["xep_0363"].upload_file(
                    filename, input_file=io.BytesIO(data), content_type=content_type,
                    timeout=TIMEOUT)
                done.set_result(url)
            except Exception as exc:  # the test's failure, with its reason
                done.set_exception(exc)
            finally:
                client.disconnect()

        client.add_event_handler("session_start", on_start)
        client.add_event_handler("failed_all_auth",
                                 lambda _e: done.set_exception(AssertionError("auth failed")))
        client.connect(host="127.0.0.1", port=server.c2s_port)
        return await asyncio.wait_for(done, 3 * TIMEOUT)

    return asyncio.run(run())


def test_slixmpp_upload_then_get_same_bytes(server: MlinkProcess, ca_file: Path) -> None:
    data = os.urandom(70_000)
    url = slixmpp_upload(server, ca_file, f"alice@{DOMAIN}", data, "holiday photo é.jpg",
                         "image/jpeg")
    assert url.startswith(f"https://{DOMAIN}:{https_port(server)}/upload/")
    status, headers, body = fetch(ca_file, url)
    assert status == 200 and body == data
    assert headers["content-type"] == "image/jpeg"
    assert headers["content-length"] == str(len(data))
    assert headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in headers["content-security-policy"]
    assert headers["content-disposition"] == \
        "inline; filename*=UTF-8''holiday%20photo%20%C3%A9.jpg"
    assert headers["access-control-allow-origin"] == "*"
    status, headers, body = fetch(ca_file, url, "HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(data))
    # The file is kept under the data directory, named by no client input.
    stored = [p for p in (data_dir(server) / "upload").rglob("*") if p.is_file()]
    assert not any("holiday" in p.name for p in stored)
    key = data_dir(server) / KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600


def test_html_is_served_as_attachment_in_a_sandbox(server: MlinkProcess,
                                                   ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    page = b"<html><script>alert(document.cookie)</script></html>"
    put_url, auth, get_url = slot_of(request_slot(client, "page.html", len(page),
                                                  "text/html"))
    assert put(ca_file, put_url, auth, page, "text/html") == 201
    status, headers, body = fetch(ca_file, get_url)
    assert status == 200 and body == page
    assert headers["content-disposition"].startswith("attachment;")
    assert headers["content-security-policy"] == "default-src 'none'; sandbox"
    client.close()


def test_disco(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    items = iq(client, DOMAIN, "<query xmlns='http://jabber.org/protocol/disco#items'/>")
    assert UPLOAD in [i.get("jid") for i in items.iter(
        "{http://jabber.org/protocol/disco#items}item")]
    info = iq(client, UPLOAD, "<query xmlns='http://jabber.org/protocol/disco#info'/>")
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("store", "file")
    assert NS in [f.get("var") for f in info.iter(
        "{http://jabber.org/protocol/disco#info}feature")]
    fields = {f.get("var"): f.findtext("{jabber:x:data}value")
              for f in info.iter("{jabber:x:data}field")}
    assert fields == {"FORM_TYPE": NS, "max-file-size": str(MAX_SIZE)}
    client.close()


def test_too_large_refused_in_xmpp_and_http(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    reply = request_slot(client, "big.bin", MAX_SIZE + 1)
    assert stanza_error_of(reply) == ("modify", "not-acceptable")
    limit = reply.find(f".//{{{NS}}}file-too-large/{{{NS}}}max-file-size")
    assert limit is not None and limit.text == str(MAX_SIZE)
    # A PUT larger than its slot: refused before the body is read.
    put_url, auth, _ = slot_of(request_slot(client, "small.bin", 10))
    assert put(ca_file, put_url, auth, b"x" * 11) == 413
    # Smaller, or another type, or another name: refused as well.
    assert put(ca_file, put_url, auth, b"x" * 9) == 400
    assert put(ca_file, put_url, auth, b"x" * 10, "text/html") == 403
    assert put(ca_file, put_url.replace("small.bin", "other.bin"), auth, b"x" * 10) == 403
    assert put(ca_file, put_url, auth, b"x" * 10) == 201
    client.close()


def test_slot_without_a_type_takes_the_puts(server: MlinkProcess, ca_file: Path) -> None:
    """XEP-0363 §6: the PUT is held to a type only if the request gave one."""
    client = login(server, ca_file, f"erin@{DOMAIN}")
    put_url, auth, get_url = slot_of(request_slot(client, "pic.png", 4, None))
    assert put(ca_file, put_url, auth, b"\x89PNG", "image/png") == 201
    status, headers, _ = fetch(ca_file, get_url)
    assert status == 200 and headers["content-type"] == "image/png"
    # Without a Content-Type either, it is stored as application/octet-stream.
    put_url, auth, get_url = slot_of(request_slot(client, "blob", 2, None))
    assert fetch(ca_file, put_url, "PUT", b"ab", {"Authorization": auth})[0] == 201
    assert fetch(ca_file, get_url)[1]["content-type"] == "application/octet-stream"
    client.close()


def test_quota_reached(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"carol@{DOMAIN}")
    upload(server, ca_file, client, b"a" * MAX_SIZE, "one.bin")
    upload(server, ca_file, client, b"b" * MAX_SIZE, "two.bin")
    reply = request_slot(client, "three.bin", MAX_SIZE)
    assert stanza_error_of(reply) == ("wait", "resource-constraint")
    assert "quota" in ET.tostring(reply, encoding="unicode")
    # What still fits is granted.
    slot_of(request_slot(client, "small.bin", QUOTA - 2 * MAX_SIZE))
    client.close()


def test_quota_checked_again_at_put(server: MlinkProcess, ca_file: Path) -> None:
    """Two slots granted before either upload: the second PUT finds the
    quota full."""
    client = login(server, ca_file, f"frank@{DOMAIN}")
    upload(server, ca_file, client, b"a" * MAX_SIZE, "one.bin")
    first = slot_of(request_slot(client, "two.bin", MAX_SIZE))
    second = slot_of(request_slot(client, "three.bin", MAX_SIZE))
    assert put(ca_file, first[0], first[1], b"b" * MAX_SIZE) == 201
    assert put(ca_file, second[0], second[1], b"c" * MAX_SIZE) == 413
    client.close()


def test_upload_in_progress_counts_for_the_quota(server: MlinkProcess,
                                                 ca_file: Path) -> None:
    """An upload under way counts at its full size: a second one started
    meanwhile finds the quota full, and the first still completes."""
    client = login(server, ca_file, f"heidi@{DOMAIN}")
    upload(server, ca_file, client, b"a" * (QUOTA - 2 * MAX_SIZE + 1), "base.bin")
    first = slot_of(request_slot(client, "one.bin", MAX_SIZE))
    second = slot_of(request_slot(client, "two.bin", MAX_SIZE))
    sock = raw_tls(https_port(server), ca_file)
    mark = server.log.mark()
    sock.sendall((f"PUT {urlsplit(first[0]).path} HTTP/1.1\r\nHost: {DOMAIN}\r\n"
                  f"Authorization: {first[1]}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {MAX_SIZE}\r\n\r\n").encode() + b"b" * 1000)
    server.wait_for_log(rf"receiving {MAX_SIZE} bytes", since=mark, timeout=TIMEOUT)
    assert put(ca_file, second[0], second[1], b"c" * MAX_SIZE) == 413
    sock.sendall(b"b" * (MAX_SIZE - 1000))
    assert read_response(sock).startswith(b"HTTP/1.1 201 ")
    sock.close()
    assert fetch(ca_file, first[2])[2] == b"b" * MAX_SIZE
    client.close()


def test_rate_limited_with_retry(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"dave@{DOMAIN}")
    for _ in range(RATE):
        slot_of(request_slot(client, "f.bin", 1))
    reply = request_slot(client, "f.bin", 1)
    assert stanza_error_of(reply) == ("wait", "resource-constraint")
    retry = reply.find(f".//{{{NS}}}retry")
    assert retry is not None and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
                                          retry.get("stamp", ""))
    client.close()


@pytest.mark.parametrize(("filename", "size", "content_type"), [
    ("../../etc/passwd", 10, None),
    ("a/b.txt", 10, None),
    ("..", 10, None),
    ("", 10, None),
    ("back\\slash.txt", 10, None),
    ("tab\there.txt", 10, None),
    ("x" * 256, 10, None),
    ("é" * 128, 10, None),
    ("ok.txt", 0, None),
    ("ok.txt", -5, None),
    ("ok.txt", "ten", None),
    ("ok.txt", "9" * 30, None),
    ("ok.txt", 10, "text/html\r\nX-Evil: 1"),
    ("ok.txt", 10, "not a type"),
])
def test_bad_requests(server: MlinkProcess, ca_file: Path, filename: str, size: object,
                      content_type: str | None) -> None:
    client = login(server, ca_file, f"erin@{DOMAIN}")
    escaped = (filename.replace("&", "&amp;").replace("'", "&apos;")
               .replace("\t", "&#9;"))
    ctype = None if content_type is None else content_type.replace("\r", "&#13;").replace(
        "\n", "&#10;")
    reply = request_slot(client, escaped, str(size), ctype)
    assert stanza_error_of(reply) == ("modify", "bad-request"), ET.tostring(reply)
    client.close()


def test_unicode_name_and_control_characters(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"erin@{DOMAIN}")
    # Unicode is a name like any other (up to 255 bytes)...
    put_url, auth, get_url = slot_of(request_slot(client, "日本語 ファイル.txt", 3,
                                                  "text/plain"))
    assert put(ca_file, put_url, auth, b"abc", "text/plain") == 201
    assert fetch(ca_file, get_url)[2] == b"abc"
    # ... a right-to-left override (a format character) is not.
    reply = request_slot(client, "photo\u202egpj.exe", 3)
    assert stanza_error_of(reply) == ("modify", "bad-request")
    client.close()


def test_not_allowed_for_users_of_another_domain(server: MlinkProcess,
                                                 ca_file: Path) -> None:
    client = RawClient(server.c2s_port, ca_file)
    client.login(OTHER, f"grace@{OTHER}", PASSWORD)
    reply = request_slot(client, "a.bin", 1)
    assert stanza_error_of(reply) == ("cancel", "not-allowed")
    # Her own domain's service grants her a slot, with her domain's URL.
    put_url, _, _ = slot_of(iq(client, f"upload.{OTHER}",
                               f"<request xmlns='{NS}' filename='a.bin' size='1'/>"))
    assert put_url.startswith(f"https://{OTHER}:")
    client.close()


def test_tampered_expired_and_reused_slots(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"erin@{DOMAIN}")
    put_url, auth, get_url = slot_of(request_slot(client, "t.bin", 4))
    expires, size, signature = auth.removeprefix("Bearer ").split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert put(ca_file, put_url, f"Bearer {expires}.{size}.{flipped}", b"abcd") == 403
    # A later expiry under the same signature: the HMAC covers it.
    assert put(ca_file, put_url, f"Bearer {int(expires) + 9999}.{size}.{signature}",
               b"abcd") == 403
    assert put(ca_file, put_url, "", b"abcd") == 403
    # Another user's directory under this user's token.
    other = re.sub(r"/upload/[0-9a-f]{32}/", "/upload/" + "0" * 32 + "/", put_url)
    assert put(ca_file, other, auth, b"abcd") == 403
    assert put(ca_file, put_url, auth, b"abcd") == 201
    # The slot is used: a second PUT, even of the same bytes, is refused.
    assert put(ca_file, put_url, auth, b"wxyz") == 409
    assert fetch(ca_file, get_url)[2] == b"abcd"
    # An expired slot, signed with the server's own key: still refused.
    key = (data_dir(server) / KEY_FILE).read_bytes()
    m = re.search(r"/upload/([0-9a-f]{32})/", put_url)
    assert m is not None
    old = Slot(m.group(1), "A" * 24, "late.bin", 4, "application/octet-stream",
               int(time.time()) - 1)
    base = put_url.split("/upload/")[0]
    status, _, body = fetch(ca_file, base + old.path(), "PUT", b"abcd",
                           {"Authorization": old.authorization(key),
                            "Content-Type": "application/octet-stream"})
    assert status == 403 and b"expired" in body
    client.close()


@pytest.mark.parametrize("path", [
    "/upload/../mlink.xml",
    "/upload/%2e%2e/%2e%2e/mlink.xml",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/..%2f..%2fmlink.xml",
    "/upload/" + "0" * 32 + "/../../http-upload.key",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/a%00b",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/" + "x" * 300,
    "/upload/x",
])
def test_path_traversal_finds_nothing(server: MlinkProcess, ca_file: Path, path: str) -> None:
    port = https_port(server)
    status, _, body = fetch(ca_file, f"https://{DOMAIN}:{port}{path}")
    assert status in (400, 404), (status, body)
    assert b"<server>" not in body and len(body) < 200


def test_options_preflight(server: MlinkProcess, ca_file: Path) -> None:
    port = https_port(server)
    status, headers, _ = fetch(ca_file, f"https://{DOMAIN}:{port}/upload/x/y/z", "OPTIONS",
                              headers={"Origin": "https://web.example",
                                       "Access-Control-Request-Method": "PUT"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert "PUT" in headers["access-control-allow-methods"]
    assert "Authorization" in headers["access-control-allow-headers"]


def test_expect_continue_refused_before_the_body(server: MlinkProcess,
                                                 ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    put_url, auth, _ = slot_of(request_slot(client, "c.bin", 10))
    sock = raw_tls(https_port(server), ca_file)
    path = urlsplit(put_url).path
    # Declares more than the slot and waits for 100-continue: the answer is
    # 413 without a byte of body sent.
    sock.sendall((f"PUT {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: {auth}\r\n"
                  "Content-Type: application/octet-stream\r\nContent-Length: 11\r\n"
                  "Expect: 100-continue\r\n\r\n").encode())
    assert read_response(sock).startswith(b"HTTP/1.1 413 ")
    sock.close()
    # Within the slot: 100 Continue, then the body, then 201.
    sock = raw_tls(https_port(server), ca_file)
    sock.sendall((f"PUT {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: {auth}\r\n"
                  "Content-Type: application/octet-stream\r\nContent-Length: 10\r\n"
                  "Expect: 100-continue\r\n\r\n").encode())
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
    sock.sendall(b"0123456789")
    assert read_response(sock).startswith(b"HTTP/1.1 201 ")
    sock.close()
    client.close()


def test_chunked_put_refused(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    put_url, auth, _ = slot_of(request_slot(client, "ch.bin", 5))
    sock = raw_tls(https_port(server), ca_file)
    sock.sendall((f"PUT {urlsplit(put_url).path} HTTP/1.1\r\nHost: {DOMAIN}\r\n"
                  f"Authorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "5\r\nhello\r\n0\r\n\r\n").encode())
    assert read_response(sock).startswith(b"HTTP/1.1 411 ")
    sock.close()
    client.close()


def test_stalled_upload_dropped_and_removed(server: MlinkProcess, ca_file: Path) -> None:
    """A client that stops mid-PUT is dropped after the idle timeout, its
    partial file removed; meanwhile the shard answers everyone else."""
    client = login(server, ca_file, f"bob@{DOMAIN}")
    size = 50_000
    put_url, auth, get_url = slot_of(request_slot(client, "stall.bin", size))
    owner_dir = data_dir(server) / "upload" / urlsplit(put_url).path.split("/")[2]
    sock = raw_tls(https_port(server), ca_file)
    mark = server.log.mark()
    sock.sendall((f"PUT {urlsplit(put_url).path} HTTP/1.1\r\nHost: {DOMAIN}\r\n"
                  f"Authorization: {auth}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {size}\r\n\r\n").encode() + b"x" * 1000)
    started = time.monotonic()
    # While it stalls, the server answers XMPP and HTTP at once.
    slot_of(request_slot(client, "other.bin", 3))
    assert fetch(ca_file, get_url)[0] == 404
    assert time.monotonic() - started < IDLE
    server.wait_for_log(rf"receiving {size} bytes", since=mark, timeout=TIMEOUT)
    assert any(p.name.startswith(".part-") for p in owner_dir.iterdir())
    response = read_response(sock)  # the server gives up after IDLE seconds
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert IDLE - 0.5 <= time.monotonic() - started < IDLE + 5
    sock.close()
    assert not any(p.name.startswith(".part-") for p in owner_dir.iterdir())
    assert fetch(ca_file, get_url)[0] == 404
    client.close()


def test_expired_file_not_served_and_swept(server: MlinkProcess, ca_file: Path) -> None:
    client = login(server, ca_file, f"bob@{DOMAIN}")
    url = upload(server, ca_file, client, b"old news", "old.txt")
    parts = urlsplit(url).path.split("/")
    stored = data_dir(server) / "upload" / parts[2] / parts[3]
    month_ago = time.time() - 31 * 86400
    os.utime(stored, (month_ago, month_ago))
    assert fetch(ca_file, url)[0] == 404
    # The sweep (run hourly by the server) removes it with its metadata,
    # and leaves a fresh file alone.
    fresh = upload(server, ca_file, client, b"new", "new.txt")
    store = UploadStore(data_dir(server) / "upload")
    assert store.sweep(30 * 86400.0, time.time()) >= 1
    assert not stored.exists() and not stored.with_suffix(".json").exists()
    assert fetch(ca_file, fresh)[2] == b"new"
    client.close()


def test_sweep_removes_crash_leftovers(tmp_path: Path) -> None:
    store = UploadStore(tmp_path)
    owner = owner_id(b"k" * 32, "x@localhost")
    part, fd = store.open_part(owner, "A" * 24, 10)
    os.close(fd)
    now = time.time()
    assert store.sweep(86400.0, now) == 0  # an upload in progress stays
    assert store.sweep(86400.0, now + STALE_PART_SECONDS + 1) == 1
    assert not part.exists()


def test_sweep_never_touches_what_it_did_not_write(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """An upload directory pointed at a shared folder by mistake: the
    sweep removes its own expired file and leftovers only; other people's
    old files, `.part-` look-alikes and foreign names inside an owner
    directory stay, and the warning is logged once, not every pass."""
    shared = tmp_path / "shared"
    owner = owner_id(b"k" * 32, "x@localhost")
    slot = "B" * 24
    theirs = [shared / "projectA" / "report.txt", shared / "home_bob" / "notes.md",
              shared / "home_bob" / ".part-draft", shared / "loose.txt",
              shared / owner / "notes.txt", shared / owner / ".part-mine",
              shared / owner / f"{slot}.bak", shared / owner / f".part-{slot}-zzzzzzzzzzzz",
              shared / ("c" * 32) / "readme"]
    store = UploadStore(shared)
    part, fd = store.open_part(owner, slot, 3)
    os.write(fd, b"old")
    assert store.commit(part, fd, owner, slot, Meta("o.txt", "text/plain", 3))
    stale_part, fd = store.open_part(owner, "C" * 24, 3)
    os.close(fd)
    ours = [shared / owner / slot, shared / owner / f"{slot}.json", stale_part]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("someone else's")
    long_ago = time.time() - 400 * 86400
    for path in theirs + ours:
        os.utime(path, (long_ago, long_ago))
    now = time.time()
    with caplog.at_level("WARNING", logger="mlink.modules.http_upload.storage"):
        assert store.sweep(30 * 86400.0, now) == 2  # the file (with its metadata), the part
        assert store.sweep(30 * 86400.0, now) == 0
    assert [p for p in ours if p.exists()] == []
    assert [p for p in theirs if not p.exists()] == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "did not write" in warnings[0], warnings
    assert "holds 8 entries" in warnings[0]
    # Removing an owner's uploads (a deleted account) spares the same names.
    assert store.remove_owner(owner) == 0
    assert [p for p in theirs if not p.exists()] == []


def test_commit_race_loser_leaves_no_metadata(tmp_path: Path) -> None:
    """Two PUTs to one slot that allows any type: the one whose link loses
    (409) must not replace the winner's name and content type."""
    store = UploadStore(tmp_path)
    owner, slot = owner_id(b"k" * 32, "x@localhost"), "R" * 24
    first, fd1 = store.open_part(owner, slot, 3)
    second, fd2 = store.open_part(owner, slot, 3)
    os.write(fd1, b"png")
    os.write(fd2, b"exe")
    assert store.commit(first, fd1, owner, slot, Meta("a.png", "image/png", 3))
    assert not store.commit(second, fd2, owner, slot,
                            Meta("a.html", "text/html", 3))
    found = store.find(owner, slot, 86400.0, time.time())
    assert found is not None
    assert found.meta == Meta("a.png", "image/png", 3)
    assert found.path.read_bytes() == b"png"
    assert sorted(p.name for p in (tmp_path / owner).iterdir()) == [slot, f"{slot}.json"]


def test_deleted_account_loses_its_uploads(server: MlinkProcess, ca_file: Path) -> None:
    """`mlink user delete` (the embedded directory's feed sees it): the
    user's files go, so old links stop working and a re-created account of
    the same JID starts with nothing stored."""
    user = f"ivan@{DOMAIN}"
    client = login(server, ca_file, user)
    url = upload(server, ca_file, client, b"private", "p.txt")
    client.close()
    other = login(server, ca_file, f"heidi@{DOMAIN}")
    kept = upload(server, ca_file, other, b"kept", "k.txt")
    other.close()
    owner_dir = data_dir(server) / "upload" / urlsplit(url).path.split("/")[2]
    assert owner_dir.is_dir()
    mark = server.log.mark()
    mlink("user", "delete", user, "--config", str(server.config))
    server.log.wait_for(rf"removed 2 upload file\(s\) of the deleted account {user}",
                        TIMEOUT, mark)
    assert not owner_dir.exists()
    assert fetch(ca_file, url)[0] == 404
    assert fetch(ca_file, kept)[2] == b"kept"
    mlink("user", "add", user, "--password", PASSWORD, "--config", str(server.config))


def test_account_deleted_in_ldap_loses_its_uploads(slapd: Any, tmp_path: Path,
                                                   cert_files: tuple[Path, Path]) -> None:
    """An LDAP change feed cannot see a deleted entry: `mlink user delete`
    tells the running server itself (control socket, `removed`), and the
    user's files go all the same; another user's stay."""
    directory = (
        '<directory backend="ldap">'
        f'<ldap base="{slapd.base_dn}" bind-dn="{slapd.bind_dn}" '
        f'bind-password="{slapd.bind_password}" pool-size="2" timeout="2">'
        f"<server>{slapd.url}</server></ldap></directory>")
    leaver, stayer = "uploader-gone@example.com", "uploader-stays@example.com"
    with start_mlink(tmp_path / "s", "example.com", cert_files, ldap=directory,
                     edit_config=add_module) as ldap_server:
        config = ldap_server.config
        for user in (leaver, stayer):
            mlink("user", "add", user, "--password", PASSWORD, "--config", str(config))
        try:
            key = (config.parent / KEY_FILE).read_bytes()
            store = UploadStore(config.parent / "upload")
            dirs = {}
            for user in (leaver, stayer):
                owner = owner_id(key, user)
                part, fd = store.open_part(owner, "L" * 24, 2)
                os.write(fd, b"hi")
                assert store.commit(part, fd, owner, "L" * 24, Meta("h", "text/plain", 2))
                dirs[user] = config.parent / "upload" / owner
            mark = ldap_server.log.mark()
            mlink("user", "delete", leaver, "--config", str(config))
            ldap_server.log.wait_for(
                rf"removed 2 upload file\(s\) of the deleted account {leaver}", TIMEOUT, mark)
            assert not dirs[leaver].exists()
            assert sorted(p.name for p in dirs[stayer].iterdir()) == ["L" * 24, "L" * 24 + ".json"]
        finally:
            for user in (leaver, stayer):
                mlink("user", "delete", user, "--config", str(config), check=False)


def test_root_with_foreign_entries_refused_in_one_line(tmp_path: Path,
                                                       cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    shared = tmp_path / "shared"
    (shared / "projectA").mkdir(parents=True)
    (shared / "projectA" / "report.txt").write_text("keep me")
    config = tmp_path / "s" / "mlink.xml"
    config.write_text(config.read_text().replace(
        "<data ", f'<modules><module name="http_upload"><directory>{shared}'
                  "</directory></module></modules>\n  <data ", 1))
    served = mlink("serve", "--config", str(config), check=False)
    assert served.returncode != 0
    assert re.search(r"mlink: shard 0: .*http_upload: .*shared holds 1 foreign entry "
                     r"\('projectA'\), not uploads", served.stderr), served.stderr
    assert "Traceback" not in served.stderr
    assert (shared / "projectA" / "report.txt").read_text() == "keep me"


def test_put_lands_on_the_other_shard(tmp_path: Path, cert_files: tuple[Path, Path],
                                      ca_file: Path) -> None:
    """The slot is granted on shard 0; a PUT accepted by shard 1 checks it
    with the shared key and stores the file, which either shard serves."""
    users = {f"alice@{DOMAIN}": PASSWORD}
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users=users,
                     edit_config=add_module, shards=2) as two:
        placement = Placement(two.log, two.c2s_port, ca_file, users, two.config)
        client = placement.login_on(0, f"alice@{DOMAIN}")
        for attempt in range(40):
            size = 1000 + attempt
            put_url, auth, get_url = slot_of(request_slot(client, "s.bin", size))
            mark = two.log.mark()
            assert put(ca_file, put_url, auth, b"s" * size) == 201
            m = two.log.wait_for(rf"shard-(\d+) .*upload of {size} bytes stored", 10, mark)
            if m.group(1) == "1":
                break
        else:
            raise AssertionError("no PUT reached shard 1")
        for _ in range(4):  # GETs land on either shard
            assert fetch(ca_file, get_url)[2] == b"s" * size
        placement.close_all()


@pytest.mark.parametrize(("option", "complaint"), [
    ("<public-url>http://files.example</public-url>", r"must be an https:// URL"),
    ("<max-file-size>-1</max-file-size>", r"must be a whole number"),
    ("<expiry-days>0</expiry-days>", r"must be 1\.\.3650"),
])
def test_bad_options_refused_with_file_and_line(tmp_path: Path, cert_files: tuple[Path, Path],
                                                option: str, complaint: str) -> None:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--tls-cert", str(cert),
          "--tls-key", str(key))
    config = tmp_path / "s" / "mlink.xml"
    config.write_text(config.read_text().replace(
        "<data ", f'<modules><module name="http_upload">{option}</module></modules>\n  <data ',
        1))
    checked = mlink("check", "--config", str(config), check=False)
    assert checked.returncode != 0
    out = checked.stderr + checked.stdout
    assert re.search(rf"mlink\.xml:\d+: .*{complaint}", out), out
    assert "Traceback" not in out


def test_unusable_directory_stops_the_server_with_one_line(tmp_path: Path,
                                                           cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    mlink("init", str(tmp_path / "s"), "--domain", DOMAIN, "--c2s-port", "0", "--tls-port", "0",
          "--ws-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "s" / "mlink.xml"
    config.write_text(config.read_text().replace(
        "<data ", f'<modules><module name="http_upload"><directory>{blocker}/upload'
                  "</directory></module></modules>\n  <data ", 1))
    served = mlink("serve", "--config", str(config), check=False)
    assert served.returncode != 0
    assert re.search(r"mlink: shard 0: .*http_upload: cannot use .*a-file", served.stderr), \
        served.stderr
    assert "Traceback" not in served.stderr


# -- the sans-IO parts -----------------------------------------------------------------


def test_slot_paths_and_grants() -> None:
    key = b"k" * 32
    owner = owner_id(key, "alice@localhost")
    assert owner != owner_id(key, "bob@localhost") and re.fullmatch(r"[0-9a-f]{32}", owner)
    assert owner != owner_id(b"j" * 32, "alice@localhost")  # keyed: not a plain hash
    slot = Slot(owner, "A" * 24, "a b/é.txt".replace("/", "_"), 5, "text/plain", 2000)
    where = parse_path(slot.path())
    assert where is not None and where.name == "a b_é.txt"
    grant = parse_authorization(slot.authorization(key))
    assert grant is not None and grant.size == 5
    assert verify(key, where, grant, "text/plain", 1999) is None
    assert "expired" in (verify(key, where, grant, "text/plain", 2001) or "")
    assert verify(key, where, grant, "text/html", 1999) is not None
    assert verify(b"j" * 32, where, grant, "text/plain", 1999) is not None
    renamed = parse_path(slot.path().replace("a%20b", "c%20d"))
    assert renamed is not None and verify(key, renamed, grant, "text/plain", 1999) is not None
    for bad in ("Bearer", "Basic abc", f"Bearer 1.5.{'x' * 42}", "Bearer -1.5." + "x" * 43):
        assert parse_authorization(bad) is None


@pytest.mark.parametrize("path", [
    "/upload/" + "0" * 31 + "/" + "A" * 24 + "/x",
    "/upload/" + "G" * 32 + "/" + "A" * 24 + "/x",
    "/upload/" + "0" * 32 + "/" + "A" * 23 + "/x",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/x/y",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/a%2Fb",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/%2e%2e",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/%ff",
    "/upload/" + "0" * 32 + "/" + "A" * 24 + "/",
    "/other/" + "0" * 32 + "/" + "A" * 24 + "/x",
])
def test_paths_that_are_not_files(path: str) -> None:
    assert parse_path(path) is None


def test_other_methods_refused(server: MlinkProcess, ca_file: Path) -> None:
    port = https_port(server)
    status, headers, _ = fetch(ca_file, f"https://{DOMAIN}:{port}/upload/" + "0" * 32 + "/"
                               + "A" * 24 + "/x", "DELETE")
    assert status == 405 and "PUT" in headers["allow"]


def test_refused_large_put_still_gets_its_answer(server: MlinkProcess, ca_file: Path) -> None:
    """A client that sends its whole body before reading (most do) gets the
    413, not a connection reset: the server reads and drops the body it
    refused for a moment before closing."""
    client = login(server, ca_file, f"bob@{DOMAIN}")
    put_url, auth, _ = slot_of(request_slot(client, "small.bin", 10))
    status, _, body = fetch(ca_file, put_url, "PUT", b"x" * (8 * 1024 * 1024),
                            {"Authorization": auth, "Content-Type": "application/octet-stream"})
    assert status == 413 and b"slot is for 10 bytes" in body
    client.close()


def test_limits_apply_on_reload(tmp_path: Path, cert_files: tuple[Path, Path],
                                ca_file: Path) -> None:
    """Options are read when used: a reload lowering max-file-size changes
    disco#info, refuses new slots above it, and refuses a PUT of a slot
    granted before it."""
    users = {f"alice@{DOMAIN}": PASSWORD}
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users=users,
                     edit_config=add_module) as one:
        client = login(one, ca_file, f"alice@{DOMAIN}")
        granted = slot_of(request_slot(client, "g.bin", 5000))
        one.config.write_text(one.config.read_text().replace(
            f"<max-file-size>{MAX_SIZE}</max-file-size>", "<max-file-size>1000</max-file-size>"))
        done = mlink("reload", "--config", str(one.config))
        assert "configuration reloaded" in done.stdout
        info = iq(client, UPLOAD, "<query xmlns='http://jabber.org/protocol/disco#info'/>")
        assert [v.text for v in info.iter("{jabber:x:data}value")][-1] == "1000"
        assert stanza_error_of(request_slot(client, "h.bin", 5000)) == ("modify",
                                                                       "not-acceptable")
        assert put(ca_file, granted[0], granted[1], b"g" * 5000) == 413
        client.close()


def test_server_sweeps_expired_files_at_start(tmp_path: Path, cert_files: tuple[Path, Path],
                                              ca_file: Path) -> None:
    """The sweeper task runs at start (then hourly): a file that expired
    while the server was down is removed, a fresh one kept."""
    users = {f"alice@{DOMAIN}": PASSWORD}
    with start_mlink(tmp_path / "s", DOMAIN, cert_files, users=users,
                     edit_config=add_module, shards=1) as first:
        client = login(first, ca_file, f"alice@{DOMAIN}")
        old_url = upload(first, ca_file, client, b"old", "old.txt")
        new_url = upload(first, ca_file, client, b"new", "new.txt")
        client.close()
        config = first.config
    parts = urlsplit(old_url).path.split("/")
    old = config.parent / "upload" / parts[2] / parts[3]
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    again = serve(config, DOMAIN, shards=1)
    try:
        again.wait_for_log(r"removed 1 expired upload file", timeout=TIMEOUT)
        assert not old.exists() and not old.with_suffix(".json").exists()
        assert fetch(ca_file, new_url.replace(f":{urlsplit(new_url).port}/",
                                              f":{https_port(again)}/"))[2] == b"new"
    finally:
        assert stop(again) == 0


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-9", (0, 9)),
    ("bytes=5-", (5, 99)),
    ("bytes=-10", (90, 99)),
    ("bytes=-1000", (0, 99)),
    ("bytes=90-1000", (90, 99)),
    ("BYTES = 1 - 2", (1, 2)),
    ("bytes=9-5", None),  # invalid: ignored
    ("bytes=0-1,5-6", None),  # several: the whole file
    ("items=0-1", None),
    ("bytes=-", None),
    ("bytes=" + "9" * 30 + "-", None),
])
def test_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(header, 100)


def test_range_downloads(server: MlinkProcess, ca_file: Path) -> None:
    """A video player seeks with Range: 206 and the bytes asked for."""
    client = login(server, ca_file, f"erin@{DOMAIN}")
    data = os.urandom(5000)
    put_url, auth, url = slot_of(request_slot(client, "clip.mp4", len(data), "video/mp4"))
    assert put(ca_file, put_url, auth, data, "video/mp4") == 201
    status, headers, body = fetch(ca_file, url, headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["content-range"] == "bytes 1000-1999/5000"
    status, headers, body = fetch(ca_file, url, headers={"Range": "bytes=-100"})
    assert status == 206 and body == data[-100:]
    status, headers, _ = fetch(ca_file, url, headers={"Range": "bytes=5000-"})
    assert status == 416 and headers["content-range"] == "bytes */5000"
    status, headers, body = fetch(ca_file, url)
    assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
    client.close()
