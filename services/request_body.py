"""A request body read within a size limit, gzip content-encoding inflated within the same limit."""

from __future__ import annotations

import zlib

from services.study_input import InputError


async def read_body(request, max_bytes: int) -> bytes:
    """The body of a Starlette request: 413 past `max_bytes` (declared or streamed), 415 for an
    encoding other than gzip/identity, 400 for broken gzip. A gzip bomb stops at the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(f"request body of {int(declared)} bytes exceeds the limit of {max_bytes}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"request body exceeds the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk: no copy
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, max_bytes + 1)
        except zlib.error as exc:
            raise InputError(f"body is not valid gzip ({exc})", 400) from None
        if len(body) > max_bytes or inflater.unconsumed_tail:
            raise InputError(f"decompressed body exceeds the limit of {max_bytes} bytes", 413)
    elif encoding != "identity":
        raise InputError(f"content-encoding {encoding!r} is not supported (gzip or identity)", 415)
    return body
