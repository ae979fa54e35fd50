"""fsck's findings: every code, its severity, and the Finding value (one table for the walk and the checks).

Finding codes (stable; scripts may match on them):

==========================  ========  ==========================================================
code                        severity  meaning
==========================  ========  ==========================================================
``layout-unreadable``       error     PATH cannot be opened at all (missing, unreadable)
``archive-corrupt``         error     PATH is not a tar archive (nor a gzip/zstd-compressed one), or a
                                      header is corrupt
``archive-truncated``       error     the tar ends in the middle of a header or a member
``not-an-image``            error     PATH is a tar (plain or compressed) that holds no image: no
                                      ``oci-layout``, ``index.json`` or docker-archive
                                      ``manifest.json`` (a root filesystem tar, say)
``compressed-corrupt``      error     the gzip/zstd stream of a compressed archive is damaged,
                                      truncated or followed by other data, or it is xz/bzip2
``compressed-too-large``    error     decompressing passes a bound (``max_size``, ``spill_max``, disk)
``archive-changed``         error     the archive was rewritten while fsck read it (the walk stops)
``member-skipped``          warning   an archive member the name policy does not serve (absolute
                                      name, ``..``, symlink, device, sparse file, ...)
``layout-missing``          error     no ``oci-layout`` file
``layout-invalid``          error     ``oci-layout`` is not JSON or has no string ``imageLayoutVersion``
``layout-version``          warning   ``imageLayoutVersion`` is not ``1.0.0``
``index-missing``           error     no ``index.json``
``index-invalid``           error     ``index.json`` is not JSON or not a valid image index
``ref-duplicate``           warning   two index.json entries carry the same ref name
``invalid-descriptor``      error     a descriptor breaks descriptor.md (digest grammar, size < 0,
                                      missing field, ``data`` not base64, ...)
``data-mismatch``           error     a descriptor's embedded ``data`` does not match its digest or size
``blob-missing``            error     a referenced blob is not in the layout
``blob-external``           warning   a referenced blob is absent but its descriptor lists ``urls``
``subject-missing``         warning   a ``subject`` manifest is absent (allowed: referrers may travel alone)
``blob-unreadable``         error     reading a blob failed (I/O error, permission)
``size-mismatch``           error     a blob's size differs from its descriptor's ``size``
``digest-mismatch``         error     a blob's content hashes to something other than its digest
``unverifiable-digest``     warning   a well-formed digest whose algorithm is not sha256/sha512
``document-too-large``      error     an index, manifest or config larger than ``MAX_JSON`` (not parsed)
``invalid-json``            error     a JSON blob (by media type) that does not parse
``invalid-document``        error     JSON that does not match its media type (index, manifest, config)
``blob-unreferenced``       warning   a blob nothing reachable from index.json refers to
``blob-invalid-path``       warning   a file under ``blobs/`` whose path names no valid digest
``diffid-mismatch``         error     ``--layers``: a layer's uncompressed content is not its config's
                                      ``rootfs.diff_ids`` entry (or the config lists another number);
                                      without ``--layers`` too for a docker-archive's layer, served
                                      under its diff_id
``layer-invalid``           error     ``--layers``: a layer ``mount --rootfs`` cannot serve (not a tar,
                                      cut short, absent, a media type that is not a layer)
``layer-member-skipped``    warning   ``--layers``: a layer member the rootfs view does not apply
                                      (``..``, a whiteout of nothing, a hardlink to nothing, ...)
``toc-mismatch``            error     ``--layers``: a zstd:chunked or eStargz layer whose TOC is not
                                      the one its manifest's annotation names, or tells other than
                                      its tar (members, metadata, bytes): a mount serves the TOC's
``toc-unused``              warning   ``--layers``: a layer's TOC that a mount cannot use (malformed,
                                      oversized, inconsistent): it reads the layer in full
``docker-manifest-invalid`` error     a docker-archive's ``manifest.json`` is not JSON, too large,
                                      not a list of images, or an image lacks Config or Layers
``docker-member-missing``   error     ``manifest.json`` names a config or layer the archive lacks
``docker-path-invalid``     error     ``manifest.json`` names a path that is absolute or has ``..``
``docker-symlink-escape``   error     a config or layer symlink points outside the archive
``docker-symlink-loop``     error     a config or layer path goes through more than 40 symlinks
``docker-config-invalid``   error     a config that is not JSON, too large, or has no valid
                                      ``rootfs.diff_ids``
``docker-config-digest``    error     a config whose content does not hash to the digest its name says
``docker-layer-count``      error     an image's Layers and its config's diff_ids differ in number
``docker-layer-compression`` error    a layer compressed in a way no OCI media type names (xz, bzip2)
==========================  ========  ==========================================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Severity(enum.Enum):
    """How bad a finding is: an error makes fsck fail, a warning does not."""

    ERROR = "error"
    WARNING = "warning"


_E, _W = Severity.ERROR, Severity.WARNING
# Every finding code and its severity; the module docstring's table describes each one.
CODES: Mapping[str, Severity] = {
    "layout-unreadable": _E,
    "archive-corrupt": _E,
    "archive-truncated": _E,
    "not-an-image": _E,
    "compressed-corrupt": _E,
    "compressed-too-large": _E,
    "archive-changed": _E,
    "member-skipped": _W,
    "layout-missing": _E,
    "layout-invalid": _E,
    "layout-version": _W,
    "index-missing": _E,
    "index-invalid": _E,
    "ref-duplicate": _W,
    "invalid-descriptor": _E,
    "data-mismatch": _E,
    "blob-missing": _E,
    "blob-external": _W,
    "subject-missing": _W,
    "blob-unreadable": _E,
    "size-mismatch": _E,
    "digest-mismatch": _E,
    "unverifiable-digest": _W,
    "document-too-large": _E,
    "invalid-json": _E,
    "invalid-document": _E,
    "blob-unreferenced": _W,
    "blob-invalid-path": _W,
    "diffid-mismatch": _E,
    "layer-invalid": _E,
    "layer-member-skipped": _W,
    "toc-mismatch": _E,
    "toc-unused": _W,
    "docker-manifest-invalid": _E,
    "docker-member-missing": _E,
    "docker-path-invalid": _E,
    "docker-symlink-escape": _E,
    "docker-symlink-loop": _E,
    "docker-config-invalid": _E,
    "docker-config-digest": _E,
    "docker-layer-count": _E,
    "docker-layer-compression": _E,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One problem fsck found: a code from CODES, where it is, and a one-line message."""

    severity: Severity
    code: str
    message: str
    digest: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The finding as the ``--json`` report spells it."""
        return {
            "severity": self.severity.value,
            "code": self.code,
            "digest": self.digest,
            "path": self.path,
            "message": self.message,
        }


def finding(code: str, message: str, *, digest: str | None = None, path: str | None = None) -> Finding:
    """A Finding with the severity CODES gives ``code``."""
    return Finding(severity=CODES[code], code=code, message=message, digest=digest, path=path)
