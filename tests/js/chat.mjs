// A real web client (xmpp.js) against mlink over WebSocket (RFC 7395):
// log in, send one chat message to PEER, wait for the reply, log out with
// the <close/> handshake. Prints one JSON line per event on stdout; the
// exit code says whether the whole exchange happened.
//
//   node chat.mjs SERVICE DOMAIN USERNAME PASSWORD PEER BODY
//
// tests/test_websocket_xmppjs.py runs it; `npm ci` in this directory
// installs the pinned @xmpp/client first.

// Node 22+ has WebSocket built in (as browsers do); Node 20 only behind a
// flag, so there the `ws` package stands in for it.
if (typeof globalThis.WebSocket === "undefined") {
  const { WebSocket } = await import("ws");
  globalThis.WebSocket = WebSocket;
}
// SCRAM in xmpp.js uses Web Crypto, global from Node 19 on.
if (!globalThis.crypto?.subtle) {
  globalThis.crypto = (await import("node:crypto")).webcrypto;
}

const { client, xml } = await import("@xmpp/client");

// Everything happens on loopback in well under a second; this bounds a
// hung exchange so the test fails instead of hanging.
const TIMEOUT_MS = 30_000;

const [service, domain, username, password, peer, body] = process.argv.slice(2);
const report = (event) => console.log(JSON.stringify(event));

const xmpp = client({ service, domain, username, password, resource: "xmppjs" });

const timer = setTimeout(() => {
  report({ event: "timeout" });
  process.exit(2);
}, TIMEOUT_MS);

xmpp.on("error", (err) => {
  report({ event: "error", message: String(err?.message ?? err) });
  process.exit(1);
});

xmpp.on("online", async (address) => {
  report({ event: "online", jid: address.toString() });
  await xmpp.send(xml("message", { to: peer, type: "chat", id: "js-1" }, xml("body", {}, body)));
  report({ event: "sent", to: peer, body });
});

xmpp.on("stanza", async (stanza) => {
  if (!stanza.is("message") || !stanza.getChildText("body")) return;
  report({ event: "message", from: stanza.attrs.from, body: stanza.getChildText("body") });
  clearTimeout(timer);
  await xmpp.stop();
  report({ event: "stopped" });
});

await xmpp.start();
