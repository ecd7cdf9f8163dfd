"""HTTP File Upload throughput (issue 16, item 5): MB/s of PUT and GET
through one shard's HTTPS listener.

    /work/main/.venv/bin/python bench/upload_throughput.py [--sizes 1,10,50] [--reps 3]

Starts its own server (`mlink init` in a temp dir, one shard, port 0,
trustme certificates, `http_upload` enabled with room for the sizes),
gets each slot over XMPP (tests/rawclient.py), then times, per size in
MiB, --reps PUTs of random bytes and GETs of the stored file, each on a
new TLS connection (http.client, as one request per connection is what
the server speaks), and prints the median MB/s (10^6 bytes/s) of each, and how many loop
stalls (over 100 ms) the shard's watchdog logged meanwhile.
The client runs in this process on the same machine: the figures are of
the pair, TLS both ways, and the box is shared with whatever else runs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.rawclient import RawClient, read_stanza  # noqa: E402
from tests.serverproc import start_mlink  # noqa: E402

DOMAIN = "localhost"
USER, PASSWORD = "bench@localhost", "bench-secret"
NS = "urn:xmpp:http:upload:0"
MIB = 1024 * 1024
# A transfer on loopback takes well under this; it bounds a hung one.
TIMEOUT = 120.0


def request(ctx: ssl.SSLContext, url: str, method: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx,
                                       timeout=TIMEOUT)
    try:
        conn.request(method, parts.path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def slot(client: RawClient, size: int, n: int) -> tuple[str, str, str]:
    client.send(f"<iq type='get' id='s{n}' to='upload.{DOMAIN}'><request xmlns='{NS}' "
                f"filename='bench.bin' size='{size}' "
                "content-type='application/octet-stream'/></iq>")
    reply = read_stanza(client, "iq", f"s{n}")
    put = reply.find(f"{{{NS}}}slot/{{{NS}}}put")
    get = reply.find(f"{{{NS}}}slot/{{{NS}}}get")
    assert put is not None and get is not None, reply
    header = put.find(f"{{{NS}}}header")
    assert header is not None
    return put.get("url", ""), header.text or "", get.get("url", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,50", help="file sizes in MiB")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert(DOMAIN, "127.0.0.1")
        cert_path, key_path, ca_path = (Path(tmp) / n for n in ("c.pem", "k.pem", "ca.pem"))
        cert.private_key_and_cert_chain_pem.write_to_path(str(key_path))
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        ca.cert_pem.write_to_path(str(ca_path))
        largest = max(sizes)
        module = (f'<modules><module name="http_upload"><max-file-size>{largest}'
                  f"</max-file-size><quota>{largest * (args.reps + 1) * len(sizes)}</quota>"
                  "<slots-per-minute>1000</slots-per-minute></module></modules>\n  <data ")
        with start_mlink(Path(tmp) / "s", DOMAIN, (cert_path, key_path),
                         users={USER: PASSWORD}, shards=1,
                         edit_config=lambda t: t.replace("<data ", module, 1)) as server:
            ctx = ssl.create_default_context(cafile=str(ca_path))
            client = RawClient(server.c2s_port, ca_path)
            client.login(DOMAIN, USER, PASSWORD)
            print(f"{'size':>8} {'PUT MB/s':>10} {'GET MB/s':>10}   (median of {args.reps})")
            n = 0
            for size in sizes:
                data = os.urandom(size)
                puts, gets = [], []
                for _ in range(args.reps):
                    n += 1
                    put_url, auth, get_url = slot(client, size, n)
                    start = time.perf_counter()
                    status, _ = request(ctx, put_url, "PUT", data, {
                        "Authorization": auth, "Content-Type": "application/octet-stream"})
                    puts.append(size / (time.perf_counter() - start) / 1e6)
                    assert status == 201, status
                    start = time.perf_counter()
                    status, body = request(ctx, get_url, "GET")
                    gets.append(size / (time.perf_counter() - start) / 1e6)
                    assert status == 200 and len(body) == size, status
                print(f"{size // MIB:>5} MiB {statistics.median(puts):>10.1f} "
                      f"{statistics.median(gets):>10.1f}")
            client.close()
            # The loop watchdog logs any stall over 100 ms: file work in
            # threads should leave none that the transfers caused.
            stalls = server.log.text().count("event loop stalled")
            print(f"loop stalls logged by the shard's watchdog: {stalls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
