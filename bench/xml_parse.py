"""Parse and serialise throughput of the XML layer (one core, no I/O).

    .venv/bin/python bench/xml_parse.py [--stanzas N] [--chunk BYTES]

The library notes measured the bare C pull parser at ~276k stanzas/s on
~330-byte messages; this shows what the hardening and event layer cost.
"""

from __future__ import annotations

import argparse
import json
import time

from mlink.xml.parser import Stanza, XMLStreamParser
from mlink.xml.serialize import serialize

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>"
)
MESSAGE = (
    b"<message to='bob@example.com/phone' from='alice@example.com/laptop' type='chat' "
    b"id='a1b2c3d4e5'><body>Hello Bob, this is a message of a typical length for a chat, "
    b"with an entity &amp; some text.</body><active xmlns='http://jabber.org/protocol/chatstates'/>"
    b"<request xmlns='urn:xmpp:receipts'/></message>"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stanzas", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    data = MESSAGE * args.stanzas
    chunks = [data[i : i + args.chunk] for i in range(0, len(data), args.chunk)]

    parser = XMLStreamParser()
    parser.feed(HEADER)
    elements = []
    started = time.process_time()
    for chunk in chunks:
        for ev in parser.feed(chunk):
            if isinstance(ev, Stanza):
                elements.append(ev.element)
    parse_s = time.process_time() - started
    assert len(elements) == args.stanzas

    started = time.process_time()
    for elem in elements:
        serialize(elem)
    ser_s = time.process_time() - started

    result = {
        "stanza_bytes": len(MESSAGE),
        "stanzas": args.stanzas,
        "parse_per_s": round(args.stanzas / parse_s),
        "serialize_per_s": round(args.stanzas / ser_s),
    }
    print(f"{'stanza bytes':>14} {'parse/s':>10} {'serialise/s':>12}")
    print(f"{result['stanza_bytes']:>14} {result['parse_per_s']:>10}"
          f" {result['serialize_per_s']:>12}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
