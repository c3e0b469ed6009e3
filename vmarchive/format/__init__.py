"""The on-disk format of a vmarchive repository (format layer).

Pure codecs, no I/O: bytes in, bytes or records out.  ``formats/FORMAT.md`` is the
specification these modules implement; ``formats/vectors/`` pins their bytes.

- ``constants``  every magic, version, feature bit, type code and size
- ``header``     the 16-byte object header and its version/feature checks; object ids
- ``chunkid``    keyed chunk ids (XXH3-128 or BLAKE2b-128) and zero detection
- ``crypto``     key material, AES-256-GCM sealing, the scrypt-wrapped key file
- ``config``     the repository config object; canonical JSON
- ``blob``       compression (+ encryption) of chunks and structure bodies
- ``pack``       pack files and their trailers
- ``index``      index objects (chunk id -> pack location)
- ``manifest``   archives: metadata and named streams with slot tables
- ``lock``       lock objects
- ``migstream*`` the QEMU migration stream parser (STREAM helper)

Imports only ``vmarchive.errors`` and third-party libraries (zstandard, xxhash,
cryptography).
"""
