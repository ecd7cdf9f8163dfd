"""XMPP load generator and the mlink/Prosody comparison (see bench/README.md)."""
