"""Digest grammar and verifiers (image-spec descriptor.md, "Digests")."""

from __future__ import annotations

import hashlib

import pytest

from ocifuse.digest import Digest, hash_chunks, hash_source
from ocifuse.errors import DigestMismatch, InvalidDigest, OcifuseError

SHA256 = "sha256:" + hashlib.sha256(b"x").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"x").hexdigest()

VALID = [
    SHA256,
    SHA512,
    # descriptor.md: well-formed digests of unregistered algorithms.
    "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
    "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    "b3:" + "a" * 64,
    "a.b-c_d+e:x=",
]

INVALID = [
    ("", "empty"),
    ("sha256", "no colon"),
    (":" + "a" * 64, "empty algorithm"),
    ("sha256:", "empty encoded"),
    ("SHA256:" + "a" * 64, "uppercase algorithm"),
    ("sha256:" + "A" * 64, "uppercase hex for a registered algorithm"),
    ("sha256:" + "a" * 63, "sha256 one hex digit short"),
    ("sha256:" + "a" * 65, "sha256 one hex digit long"),
    ("sha256:" + "g" * 64, "not hex"),
    ("sha512:" + "a" * 64, "sha512 with a sha256 length"),
    ("sha512:" + "a" * 127, "sha512 one hex digit short"),
    ("sha256+:abc", "separator without a component after it"),
    ("+sha256:abc", "separator first"),
    ("sha256..x:abc", "two separators"),
    ("sha256:ab/cd", "slash in encoded"),
    ("sha256:ab cd", "space in encoded"),
    (SHA256 + "\n", "trailing newline"),
    (" " + SHA256, "leading space"),
    ("sha256:aa:bb", "second colon"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_digests_parse_and_round_trip(text: str) -> None:
    """Every well-formed digest parses, and str() gives it back unchanged."""
    d = Digest.parse(text)
    assert str(d) == text
    assert f"{d.algorithm}:{d.encoded}" == text


@pytest.mark.parametrize(("text", "why"), INVALID, ids=[why for _, why in INVALID])
def test_invalid_digests_are_refused(text: str, why: str) -> None:
    """Malformed digests raise InvalidDigest, which carries the value and is an OcifuseError."""
    with pytest.raises(InvalidDigest) as info:
        Digest.parse(text)
    assert info.value.value in (text, repr(text))
    assert isinstance(info.value, OcifuseError)


@pytest.mark.parametrize("value", [None, 42, b"sha256:abc", ["sha256:abc"]])
def test_non_strings_are_invalid(value: object) -> None:
    """A digest field of another JSON type is InvalidDigest, not a TypeError."""
    with pytest.raises(InvalidDigest):
        Digest.parse(value)


def test_registered_algorithms_are_verifiable_others_are_not() -> None:
    """sha256 and sha512 verify; an unknown well-formed algorithm parses but cannot be verified."""
    assert Digest.parse(SHA256).verifiable
    assert Digest.parse(SHA512).verifiable
    other = Digest.parse("b3:" + "a" * 64)
    assert not other.verifiable
    with pytest.raises(InvalidDigest, match="not supported"):
        other.verifier()


def test_path_and_from_path() -> None:
    """A digest's layout path is blobs/<alg>/<encoded>; from_path reverses it and refuses others."""
    d = Digest.parse(SHA512)
    assert d.path == f"blobs/sha512/{d.encoded}"
    assert Digest.from_path(d.path) == d
    assert Digest.from_path("blobs/sha256/nothex") is None
    assert Digest.from_path("index.json") is None
    assert Digest.from_path(f"blobs/sha256/{'a' * 64}/extra") is None
    assert Digest.from_path(f"other/sha256/{'a' * 64}") is None


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_of_matches_hashlib(algorithm: str) -> None:
    """Digest.of hashes with the named algorithm."""
    assert Digest.of(b"abc", algorithm) == Digest(algorithm, hashlib.new(algorithm, b"abc").hexdigest())


def test_digests_compare_and_hash_by_value() -> None:
    """Two parses of one string are equal and usable as set members."""
    assert Digest.parse(SHA256) == Digest.parse(SHA256)
    assert len({Digest.parse(SHA256), Digest.parse(SHA256), Digest.parse(SHA512)}) == 2


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_verifier_streams_and_checks(algorithm: str) -> None:
    """Chunks fed one by one verify like the whole; a different byte raises DigestMismatch."""
    data = bytes(range(256)) * 1000
    good = Digest.of(data, algorithm)
    v = good.verifier()
    for i in range(0, len(data), 4096):
        v.update(memoryview(data)[i : i + 4096])
    assert v.length == len(data)
    assert v.found() == good
    v.check()

    bad = good.verifier()
    bad.update(data[:-1] + b"\x00")
    with pytest.raises(DigestMismatch) as info:
        bad.check()
    assert info.value.expected == str(good)
    assert info.value.found == str(Digest.of(data[:-1] + b"\x00", algorithm))


def test_verifier_of_nothing_is_the_empty_digest() -> None:
    """The empty blob's digest verifies after no update at all."""
    empty = Digest.parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    empty.verifier().check()


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_hash_chunks_is_the_digest_of_the_whole(algorithm: str) -> None:
    """The chunks' digest is the digest of their concatenation; progress sees every chunk's length."""
    seen: list[int] = []
    found = hash_chunks([b"ab", bytearray(b"c"), memoryview(b"def")], algorithm, progress=seen.append)
    assert found == Digest.of(b"abcdef", algorithm) and seen == [2, 1, 3]


def test_hash_source_reads_in_chunks_up_to_size() -> None:
    """``size`` bytes, ``chunk`` at a time, never past ``size``; an empty read ends the pass."""
    data = bytes(range(256)) * 40
    asked: list[tuple[int, int]] = []

    def pread(offset: int, size: int) -> bytes:
        asked.append((offset, size))
        return data[offset : offset + size]

    assert hash_source(pread, 10000, chunk=4096) == Digest.of(data[:10000])
    assert asked == [(0, 4096), (4096, 4096), (8192, 1808)]
    assert hash_source(pread, len(data) + 100) == Digest.of(data)  # cut short: what was read
    assert hash_source(pread, 0) == Digest.of(b"")
