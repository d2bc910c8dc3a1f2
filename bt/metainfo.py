"""Torrent metainfo (BEP 3, BEP 12 tiers, BEP 47 pad files and attributes,
BEP 52 hybrids through their v1 side): a strict parser of untrusted bytes
into frozen dataclasses.

A ``.torrent`` comes from anywhere, so everything here treats it as hostile:
every field is type- and range-checked, and a malformed file raises
:class:`MetainfoError` with one line naming the field, such as
``info.pieces: length 41 is not a multiple of 20``.  File paths are checked
too: no path in a torrent can name anything outside the download directory
(``..``, absolute paths, drive letters, empty or ``.`` components, NUL or a
separator inside a component), and two files cannot claim one path.

The v1 infohash is the SHA-1 of the ``info`` dictionary's bytes exactly as
they appear in the file (:func:`_utpkit.bencode.decode_with_spans_untrusted`
gives their span), never of a re-encoding.  A hybrid v1+v2 torrent (BEP 52,
as libtorrent creates them) loads through its v1 side -- the ``pieces`` and
``files`` keys, whose pad files keep every file piece-aligned -- and its v2
infohash (SHA-256 of the same bytes) is recorded; a v2-only torrent is
refused, since utpkit speaks v1 on the wire.

Sans-I/O: nothing here opens a file except :func:`load_metainfo`, a
convenience for callers that have a path.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from _utpkit.bencode import BencodeError, decode_with_spans_untrusted, encode
from _utpkit.errors import RemoteProtocolError

__all__ = ["MetainfoError", "FileEntry", "Metainfo", "FileSlice", "parse_metainfo_untrusted",
           "parse_info_untrusted",
           "load_metainfo", "check_path_components", "MAX_TORRENT_SIZE", "MAX_PIECE_LENGTH",
           "MAX_FILES"]

#: A .torrent larger than this is refused before decoding.  The biggest
#: real torrents (hundreds of thousands of files, or v2 piece layers) stay
#: well under it; a hostile one cannot make us decode gigabytes.
MAX_TORRENT_SIZE = 64 * 1024 * 1024
#: Largest accepted piece: the storage holds a whole piece in memory to hash
#: it, so an absurd piece length is refused here, not at the first piece.
MAX_PIECE_LENGTH = 128 * 1024 * 1024
#: Most files in one torrent (each costs a FileEntry and, in storage, a path).
MAX_FILES = 1_000_000
#: Bencode nesting accepted in a torrent: the v2 ``file tree`` nests one
#: dictionary per directory level, so the DHT's limit of 16 is too tight.
MAX_DEPTH = 100


class MetainfoError(RemoteProtocolError):
    """A torrent that is malformed or unsafe.  The message is one line and
    starts with the field it is about (``info.files[3].path: ...``)."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a torrent, as laid out in the v1 byte stream.

    ``path`` is relative to the download directory and already checked safe
    (see :func:`check_path_components`): ``(name,)`` for a single-file
    torrent, ``(name, dir, ..., file)`` for a multi-file one.  ``offset`` is
    where the file starts in the concatenation of all files (pieces are cut
    from that stream).  ``attr`` holds BEP 47's letters: ``p`` pad file
    (zeros, never written to disk), ``x`` executable, ``h`` hidden, ``l``
    symlink (to ``symlink_path``)."""

    path: tuple[str, ...]
    length: int
    offset: int
    attr: str = ""
    symlink_path: tuple[str, ...] | None = None
    mtime: int | None = None

    @property
    def pad(self) -> bool:
        return "p" in self.attr

    @property
    def executable(self) -> bool:
        return "x" in self.attr

    @property
    def hidden(self) -> bool:
        return "h" in self.attr

    @property
    def symlink(self) -> bool:
        return "l" in self.attr

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class FileSlice:
    """A run of bytes of one file: ``length`` bytes at ``file_offset`` of
    ``files[file_index]``.  What a piece's byte range maps to."""

    file_index: int
    file_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Metainfo:
    """A parsed torrent.  Build it with :func:`parse_metainfo_untrusted`.

    ``info_bytes`` are the raw bytes of the info dictionary (what ut_metadata
    serves and what ``info_hash`` hashes).  ``trackers`` gives the BEP 12
    tiers: ``announce-list`` when present, else ``announce`` as one tier."""

    info_hash: bytes
    info_hash_v2: bytes | None
    name: str
    piece_length: int
    pieces: bytes
    files: tuple[FileEntry, ...]
    total_length: int
    private: bool
    announce: str | None
    announce_list: tuple[tuple[str, ...], ...]
    info_bytes: bytes = field(repr=False)
    meta_version: int = 1
    multi_file: bool = False
    comment: str | None = None
    created_by: str | None = None
    creation_date: int | None = None
    url_list: tuple[str, ...] = ()
    _offsets: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // 20

    @property
    def hybrid(self) -> bool:
        """A BEP 52 hybrid: loaded through its v1 side."""
        return self.info_hash_v2 is not None

    @property
    def trackers(self) -> tuple[tuple[str, ...], ...]:
        if self.announce_list:
            return self.announce_list
        return ((self.announce,),) if self.announce else ()

    def piece_hash(self, index: int) -> bytes:
        """The SHA-1 the piece's data must have."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.num_pieces - 1}")
        return self.pieces[20 * index:20 * index + 20]

    def piece_size(self, index: int) -> int:
        """Bytes in piece ``index``: ``piece_length`` except for a shorter last piece."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.num_pieces - 1}")
        if index == self.num_pieces - 1:
            return self.total_length - index * self.piece_length
        return self.piece_length

    def map_range(self, offset: int, length: int) -> Iterator[FileSlice]:
        """The file slices covering ``length`` bytes at ``offset`` of the
        torrent's byte stream, in order (zero-length files are skipped).
        Pad files appear too; a storage reads them as zeros."""
        if offset < 0 or length < 0 or offset + length > self.total_length:
            raise ValueError(f"range {offset}+{length} outside the torrent's {self.total_length} bytes")
        i = bisect.bisect_right(self._offsets, offset) - 1
        end = offset + length
        while offset < end:
            f = self.files[i]
            if f.length and offset < f.end:
                n = min(end, f.end) - offset
                yield FileSlice(i, offset - f.offset, n)
                offset += n
            i += 1

    def map_piece(self, index: int, offset: int = 0, length: int | None = None) -> Iterator[FileSlice]:
        """The file slices of ``length`` bytes (default: to the piece's end)
        at ``offset`` within piece ``index``."""
        size = self.piece_size(index)
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"range {offset}+{length} outside piece {index} of {size} bytes")
        return self.map_range(index * self.piece_length + offset, length)

    def to_torrent_bytes(self) -> bytes:
        """A .torrent holding this metainfo: the info dictionary's bytes
        exactly as parsed (so the infohash is unchanged), with the trackers,
        comment, creator and date around it (e.g. to save a torrent fetched
        through a magnet link)."""
        top: dict[bytes, Any] = {}
        if self.announce:
            top[b"announce"] = self.announce.encode()
        if self.announce_list:
            top[b"announce-list"] = [[u.encode() for u in tier] for tier in self.announce_list]
        if self.comment:
            top[b"comment"] = self.comment.encode()
        if self.created_by:
            top[b"created by"] = self.created_by.encode()
        if self.creation_date is not None:
            top[b"creation date"] = self.creation_date
        if self.url_list:
            top[b"url-list"] = [u.encode() for u in self.url_list]
        # Our encoder cannot embed raw bytes, so splice the info dictionary
        # in at its sorted place.
        parts = [b"d"]
        for k in sorted([*top, b"info"]):
            parts.append(b"%d:%s" % (len(k), k))
            parts.append(self.info_bytes if k == b"info" else encode(top[k]))
        parts.append(b"e")
        return b"".join(parts)

    def file_pieces(self, file_index: int) -> range:
        """The pieces that hold bytes of ``files[file_index]`` (empty for an
        empty file)."""
        f = self.files[file_index]
        if not f.length:
            return range(0)
        return range(f.offset // self.piece_length, (f.end - 1) // self.piece_length + 1)


# --- parsing ------------------------------------------------------------------------------


def load_metainfo(path: str | os.PathLike[str]) -> Metainfo:
    """Read and parse a .torrent file.  OSError if it cannot be read;
    MetainfoError if it is not a valid torrent."""
    with open(path, "rb") as f:
        data = f.read(MAX_TORRENT_SIZE + 1)
    return parse_metainfo_untrusted(data)


def parse_metainfo_untrusted(data: bytes) -> Metainfo:
    """Parse the bytes of a .torrent file.  Raises MetainfoError (and only
    that, for any input) when they are not a valid, safe torrent."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("a torrent is bytes")
    data = bytes(data)
    if len(data) > MAX_TORRENT_SIZE:
        raise MetainfoError(f"torrent: {len(data)} bytes is more than the limit of {MAX_TORRENT_SIZE}")
    try:
        top, spans = decode_with_spans_untrusted(data, max_depth=MAX_DEPTH, max_size=MAX_TORRENT_SIZE)
    except BencodeError as exc:
        raise MetainfoError(f"torrent: not valid bencode: {exc}") from None
    info = top.get(b"info")
    if info is None:
        raise MetainfoError("info: missing")
    if not isinstance(info, dict):
        raise MetainfoError(f"info: expected a dictionary, got {_kind(info)}")
    start, end = spans[b"info"]
    info_bytes = data[start:end]
    return _parse(top, info, info_bytes)


def parse_info_untrusted(info_bytes: bytes, *, trackers: Sequence[Sequence[str]] = ()) -> Metainfo:
    """Build a Metainfo from an info dictionary alone -- what a magnet
    link's ut_metadata exchange (BEP 9) delivers -- with ``trackers`` (tiers,
    e.g. the magnet's ``tr`` parameters) as its announce-list.  The caller
    compares ``info_hash`` with the one it asked for."""
    if not isinstance(info_bytes, (bytes, bytearray, memoryview)):
        raise TypeError("an info dictionary is bytes")
    info_bytes = bytes(info_bytes)
    try:
        info, _ = decode_with_spans_untrusted(info_bytes, max_depth=MAX_DEPTH, max_size=MAX_TORRENT_SIZE)
    except BencodeError as exc:
        raise MetainfoError(f"info: not valid bencode: {exc}") from None
    tiers = [[u.encode() for u in tier] for tier in trackers if tier]
    top: dict = {b"announce-list": tiers} if tiers else {}
    if tiers:
        top[b"announce"] = tiers[0][0]
    return _parse(top, info, info_bytes)


def _kind(v: Any) -> str:
    return {int: "an integer", bytes: "a string", list: "a list", dict: "a dictionary"}.get(type(v), "?")


def _get(d: dict, key: bytes, where: str, typ: type, required: bool = True) -> Any:
    v = d.get(key)
    if v is None:
        if required:
            raise MetainfoError(f"{where}: missing")
        return None
    if type(v) is not typ:
        raise MetainfoError(f"{where}: expected {_kind(typ())}, got {_kind(v)}")
    return v


def _text(b: bytes) -> str:
    # Names are UTF-8 by convention; invalid sequences become U+FFFD so the
    # name is printable and has one spelling on disk (libtorrent also
    # replaces rather than refuses).
    return b.decode("utf-8", "replace")


def _str(d: dict, key: bytes, where: str, required: bool = False) -> str | None:
    v = _get(d, key, where, bytes, required)
    return None if v is None else _text(v)


def _loose(d: dict, key: bytes, typ: type) -> Any:
    v = d.get(key)
    if type(v) is not typ:
        return None
    return _text(v) if isinstance(v, bytes) else v


def _utf8_variant(d: dict, key: bytes) -> bytes:
    # BEP 3's strings are bytes; some creators add "name.utf-8" / "path.utf-8"
    # next to a legacy-encoded original.  Prefer the UTF-8 one.
    return key + b".utf-8" if key + b".utf-8" in d else key


def check_path_components(parts: tuple[str, ...] | list[str], where: str) -> tuple[str, ...]:
    """Refuse a path that could leave the download directory or does not
    name a file: ``..``, ``.``, empty components, NUL, ``/`` or ``\\``
    inside a component (a separator on some system), and a drive letter
    (``C:``).  Returns the parts as a tuple; raises MetainfoError naming
    ``where`` and the offending component."""
    if not parts:
        raise MetainfoError(f"{where}: empty path")
    for c in parts:
        if c in ("", ".", ".."):
            raise MetainfoError(f"{where}: unsafe path component {c!r} in {'/'.join(parts)!r}")
        for bad, why in (("\0", "a NUL byte"), ("/", "a '/'"), ("\\", "a '\\'")):
            if bad in c:
                raise MetainfoError(f"{where}: path component {c!r} contains {why}")
        if len(c) >= 2 and c[1] == ":" and c[0].isascii() and c[0].isalpha():
            raise MetainfoError(f"{where}: path component {c!r} is a drive letter")
        if len(c.encode("utf-8", "surrogateescape")) > 255:
            raise MetainfoError(f"{where}: path component {c[:40]!r}... is longer than 255 bytes")
    return tuple(parts)


def _attr(d: dict, where: str) -> str:
    a = _get(d, b"attr", where + ".attr", bytes, required=False)
    if a is None:
        return ""
    # BEP 47: unknown letters are ignored (a newer creator's attributes).
    return "".join(sorted({chr(c) for c in a if chr(c) in "pxhl"}))


def _symlink(d: dict, attr: str, where: str) -> tuple[str, ...] | None:
    if "l" not in attr:
        return None
    sp = _get(d, b"symlink path", where + ".symlink path", list)
    parts = []
    for k, c in enumerate(sp):
        if type(c) is not bytes:
            raise MetainfoError(f"{where}.symlink path[{k}]: expected a string, got {_kind(c)}")
        parts.append(_text(c))
    # A symlink target is a path inside the torrent: the same rules apply.
    return check_path_components(parts, where + ".symlink path")


def _length(d: dict, where: str) -> int:
    n = _get(d, b"length", where, int)
    if n < 0:
        raise MetainfoError(f"{where}: negative length {n}")
    return n


def _mtime(d: dict, where: str) -> int | None:
    return _get(d, b"mtime", where + ".mtime", int, required=False)


def _file_tree_leaves(tree: dict, prefix: tuple[bytes, ...], where: str,
                      out: list[tuple[tuple[bytes, ...], int]]) -> None:
    # BEP 52: directories are dictionaries keyed by name; a file is the
    # dictionary under the empty key, holding its length.
    for k, v in tree.items():
        w = f"{where}/{_text(k)}" if k else where
        if type(v) is not dict:
            raise MetainfoError(f"info.file tree{w}: expected a dictionary, got {_kind(v)}")
        if k == b"":
            if not prefix:
                raise MetainfoError("info.file tree: a file without a name")
            length = _get(v, b"length", f"info.file tree{w}.length", int)
            out.append((prefix, length))
        else:
            _file_tree_leaves(v, prefix + (k,), w, out)
    if len(out) > MAX_FILES:
        raise MetainfoError(f"info.file tree: more than {MAX_FILES} files")


def _check_hybrid(tree: dict, files: list[FileEntry], multi: bool) -> None:
    """A hybrid's v2 file tree must describe the same files as its v1 side
    (BEP 52): otherwise v1 and v2 peers would be sharing different content
    under one torrent."""
    leaves: list[tuple[tuple[bytes, ...], int]] = []
    _file_tree_leaves(tree, (), "", leaves)
    v2 = sorted((tuple(_text(c) for c in p), n) for p, n in leaves)
    v1 = sorted(((f.path[1:] if multi else f.path), f.length) for f in files if not f.pad)
    if v1 != v2:
        raise MetainfoError("info.file tree: does not describe the same files as the v1 side "
                            "(a hybrid torrent must)")


def _parse(top: dict, info: dict, info_bytes: bytes) -> Metainfo:
    meta_version = _get(info, b"meta version", "info.meta version", int, required=False)
    if meta_version is None:
        meta_version = 1
    if meta_version not in (1, 2):
        raise MetainfoError(f"info.meta version: unsupported version {meta_version}")
    hybrid = meta_version == 2
    if hybrid:
        _get(info, b"file tree", "info.file tree", dict)
        if b"pieces" not in info:
            raise MetainfoError("info.pieces: missing (a v2-only torrent; utpkit speaks BitTorrent v1)")
        _get(top, b"piece layers", "piece layers", dict, required=False)

    name_key = _utf8_variant(info, b"name")
    name = _str(info, name_key, "info." + name_key.decode(), required=True)
    assert name is not None
    check_path_components((name,), "info.name")

    piece_length = _get(info, b"piece length", "info.piece length", int)
    if not 0 < piece_length <= MAX_PIECE_LENGTH:
        raise MetainfoError(f"info.piece length: {piece_length} is outside 1..{MAX_PIECE_LENGTH}")
    if hybrid and (piece_length < 16384 or piece_length & (piece_length - 1)):
        raise MetainfoError(f"info.piece length: {piece_length} is not a power of two of "
                            "at least 16 KiB, as BEP 52 requires")
    pieces = _get(info, b"pieces", "info.pieces", bytes)
    if len(pieces) % 20:
        raise MetainfoError(f"info.pieces: length {len(pieces)} is not a multiple of 20")

    files: list[FileEntry] = []
    offset = 0
    has_length = b"length" in info
    has_files = b"files" in info
    if has_length == has_files:
        raise MetainfoError("info: needs exactly one of 'length' (one file) and 'files' (several)")
    if has_length:
        length = _length(info, "info.length")
        attr = _attr(info, "info")
        files.append(FileEntry((name,), length, 0, attr, _symlink(info, attr, "info"),
                               _mtime(info, "info")))
        offset = length
    else:
        flist = _get(info, b"files", "info.files", list)
        if not flist:
            raise MetainfoError("info.files: empty list")
        if len(flist) > MAX_FILES:
            raise MetainfoError(f"info.files: {len(flist)} files is more than the limit of {MAX_FILES}")
        seen: dict[tuple[str, ...], int] = {}
        dirs: set[tuple[str, ...]] = set()
        for k, fd in enumerate(flist):
            where = f"info.files[{k}]"
            if type(fd) is not dict:
                raise MetainfoError(f"{where}: expected a dictionary, got {_kind(fd)}")
            length = _length(fd, where + ".length")
            attr = _attr(fd, where)
            pkey = _utf8_variant(fd, b"path")
            pwhere = f"{where}.{pkey.decode()}"
            plist = _get(fd, pkey, pwhere, list)
            parts = []
            for j, c in enumerate(plist):
                if type(c) is not bytes:
                    raise MetainfoError(f"{pwhere}[{j}]: expected a string, got {_kind(c)}")
                parts.append(_text(c))
            path = (name, *check_path_components(parts, pwhere))
            if "p" not in attr:
                # Pad files may share a path (libtorrent names them .pad/<size>):
                # they are never written, so they cannot collide on disk.
                if path in seen:
                    raise MetainfoError(f"{pwhere}: {'/'.join(path)!r} is also info.files[{seen[path]}]")
                if path in dirs:
                    raise MetainfoError(f"{pwhere}: {'/'.join(path)!r} is also a directory of another file")
                for n in range(1, len(path)):
                    if path[:n] in seen:
                        raise MetainfoError(f"{pwhere}: {'/'.join(path)!r} lies under info.files"
                                            f"[{seen[path[:n]]}], which is a file")
                    dirs.add(path[:n])
                seen[path] = k
            files.append(FileEntry(path, length, offset, attr, _symlink(fd, attr, where),
                                   _mtime(fd, where)))
            offset += length
    total = offset
    if hybrid:
        _check_hybrid(info[b"file tree"], files, has_files)
    if total == 0:
        raise MetainfoError("info: the torrent holds no data (total length 0)")
    want = -(-total // piece_length)
    if len(pieces) // 20 != want:
        raise MetainfoError(f"info.pieces: {len(pieces) // 20} hashes for {want} pieces "
                            f"({total} bytes in pieces of {piece_length})")

    private_v = _get(info, b"private", "info.private", int, required=False)
    announce = _str(top, b"announce", "announce")
    tiers: list[tuple[str, ...]] = []
    al = _get(top, b"announce-list", "announce-list", list, required=False) or []
    for t, tier in enumerate(al):
        if type(tier) is not list:
            raise MetainfoError(f"announce-list[{t}]: expected a list, got {_kind(tier)}")
        urls = []
        for u, url in enumerate(tier):
            if type(url) is not bytes:
                raise MetainfoError(f"announce-list[{t}][{u}]: expected a string, got {_kind(url)}")
            urls.append(_text(url))
        if urls:     # BEP 12 does not forbid empty tiers; they carry nothing
            tiers.append(tuple(urls))
    url_list: tuple[str, ...] = ()
    ul = top.get(b"url-list")
    if type(ul) is bytes:
        url_list = (_text(ul),) if ul else ()
    elif type(ul) is list:
        url_list = tuple(_text(u) for u in ul if type(u) is bytes)

    return Metainfo(
        info_hash=hashlib.sha1(info_bytes).digest(),
        info_hash_v2=hashlib.sha256(info_bytes).digest() if hybrid else None,
        name=name,
        piece_length=piece_length,
        pieces=pieces,
        files=tuple(files),
        total_length=total,
        private=bool(private_v),
        announce=announce,
        announce_list=tuple(tiers),
        info_bytes=info_bytes,
        meta_version=meta_version,
        multi_file=has_files,
        # Informational fields outside the info dictionary: a wrong type
        # there is ignored, as libtorrent does, rather than refusing a
        # torrent whose content is fine.
        comment=_loose(top, b"comment", bytes),
        created_by=_loose(top, b"created by", bytes),
        creation_date=_loose(top, b"creation date", int),
        url_list=url_list,
        _offsets=tuple(f.offset for f in files),
    )
