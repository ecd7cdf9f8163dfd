"""RFC 9266 tls-exporter channel binding for Python's ssl module, via ctypes.

Why: SCRAM-*-PLUS on TLS 1.3 needs the "tls-exporter" binding (tls-unique is
forbidden there), but Python 3.11's ssl module cannot export keying material
(cpython issue 95341 is still open). OpenSSL can: SSL_export_keying_material.
This module finds the `SSL *` that CPython keeps inside an ssl.SSLObject (or
SSLSocket) and calls that function through ctypes.

How it stays safe:
  * the OpenSSL symbols are looked up through the handle of CPython's own
    `_ssl` extension, so they come from the very libssl it is linked to;
  * the `SSL *` is read from the `_ssl._SSLSocket` object layout
    (PyObject_HEAD, PyObject *Socket, SSL *ssl — unchanged since 3.7) and is
    only trusted if SSL_get_SSL_CTX() on it returns the `SSL_CTX *` read from
    the object's SSLContext (PyObject_HEAD, SSL_CTX *ctx), and SSL_version()
    agrees with `version()`;
  * any doubt (another interpreter, missing symbols, a layout mismatch)
    yields None, and the caller simply does not offer tls-exporter.

With trio, pass `ssl_stream._ssl_object` (trio's SSLStream does not forward
custom attributes; the attribute is private but has been stable for years).
Call only after the handshake has completed.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from functools import cache

from mlink.sasl.channel_binding import EXPORTER_LABEL, EXPORTER_LENGTH

__all__ = ["tls_exporter"]

# OpenSSL's protocol number for TLS 1.3 (TLS1_3_VERSION in ssl.h); RFC 9266
# defines tls-exporter for TLS 1.3 (and 1.2 with EMS, which we do not check).
_TLS1_3_VERSION = 0x0304

_PTR = ctypes.sizeof(ctypes.c_void_p)
# Offsets inside CPython objects: the base object header is followed by the
# struct fields named in the module docstring.
_HEAD = object.__basicsize__
_SSLSOCKET_SSL_OFFSET = _HEAD + _PTR  # skip PyObject *Socket
_SSLCONTEXT_CTX_OFFSET = _HEAD


class _OpenSSL:
    """The few libssl functions we need, bound with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.export = lib.SSL_export_keying_material
        self.export.restype = ctypes.c_int
        self.export.argtypes = [
            ctypes.c_void_p,  # SSL *s
            ctypes.c_char_p,  # unsigned char *out
            ctypes.c_size_t,  # size_t olen
            ctypes.c_char_p,  # const char *label
            ctypes.c_size_t,  # size_t llen
            ctypes.c_char_p,  # const unsigned char *context
            ctypes.c_size_t,  # size_t contextlen
            ctypes.c_int,  # int use_context
        ]
        self.get_ctx = lib.SSL_get_SSL_CTX
        self.get_ctx.restype = ctypes.c_void_p
        self.get_ctx.argtypes = [ctypes.c_void_p]
        self.version = lib.SSL_version
        self.version.restype = ctypes.c_int
        self.version.argtypes = [ctypes.c_void_p]


@cache
def _openssl() -> _OpenSSL | None:
    """Bind libssl once; None when this interpreter does not allow it."""
    if sys.implementation.name != "cpython":
        return None
    try:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        # A built-in _ssl has no file: OpenSSL is then in the global namespace.
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        return _OpenSSL(lib)
    except (ImportError, OSError, AttributeError):
        return None


def _read_pointer(obj: object, offset: int) -> int | None:
    """Read a pointer field at `offset` inside a live CPython object."""
    if type(obj).__basicsize__ < offset + _PTR:
        return None
    return ctypes.c_void_p.from_address(id(obj) + offset).value


def tls_exporter(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes | None:
    """The RFC 9266 tls-exporter binding of a TLS 1.3 connection, or None.

    None means: not TLS 1.3, handshake not done, or the ctypes route is not
    trustworthy on this interpreter; do not advertise tls-exporter then.
    """
    if ssl_object.version() != "TLSv1.3":
        return None
    lib = _openssl()
    inner = getattr(ssl_object, "_sslobj", None)
    if lib is None or inner is None:
        return None
    import _ssl

    if not isinstance(inner, _ssl._SSLSocket):  # type: ignore[attr-defined]
        return None
    ssl_ptr = _read_pointer(inner, _SSLSOCKET_SSL_OFFSET)
    ctx_ptr = _read_pointer(ssl_object.context, _SSLCONTEXT_CTX_OFFSET)
    if not ssl_ptr or not ctx_ptr:
        return None
    # `inner` stays referenced until we return, so the SSL * stays valid.
    if lib.get_ctx(ssl_ptr) != ctx_ptr or lib.version(ssl_ptr) != _TLS1_3_VERSION:
        return None
    out = ctypes.create_string_buffer(EXPORTER_LENGTH)
    ok = lib.export(
        ssl_ptr,
        out,
        EXPORTER_LENGTH,
        EXPORTER_LABEL,
        len(EXPORTER_LABEL),
        b"",  # RFC 9266: empty context (not "no context")
        0,
        1,
    )
    if ok != 1:
        return None
    return out.raw
