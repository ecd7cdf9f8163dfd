"""mlink: a directory-centred XMPP server."""
__version__ = "0.1.0"
