"""bt.metainfo: parsing torrents (BEP 3/12/47/52-hybrid), the infohash over
the raw info bytes, one-line errors naming the field, path safety, and
fuzzing (every input parses or raises MetainfoError)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _utpkit.bencode import BencodeError, decode_with_spans_untrusted, encode
from _utpkit.errors import ProtocolError, RemoteProtocolError
from bt.metainfo import MetainfoError, parse_info_untrusted, parse_metainfo_untrusted


def _torrent(info: dict, **top) -> bytes:
    d = {b"info": info}
    hyphened = {"announce_list": b"announce-list", "url_list": b"url-list"}
    d.update({hyphened.get(k, k.replace("_", " ").encode()): v for k, v in top.items()})
    return encode(d)


def _multi(files, piece_length=16384, name=b"dir"):
    total = sum(f[b"length"] for f in files)
    n = -(-total // piece_length)
    return {b"name": name, b"piece length": piece_length, b"pieces": b"\x01" * 20 * n, b"files": files}


def _single(length=40000, piece_length=16384, name=b"file.bin"):
    n = -(-length // piece_length)
    return {b"name": name, b"piece length": piece_length, b"pieces": bytes(range(20)) * n, b"length": length}


# ---- bencode spans ------------------------------------------------------------------------


def test_spans_give_the_exact_bytes_of_each_value():
    data = b"d1:ai1e4:infod1:xli1ei2eee1:z3:abce"
    value, spans = decode_with_spans_untrusted(data)
    assert value == {b"a": 1, b"info": {b"x": [1, 2]}, b"z": b"abc"}
    assert data[slice(*spans[b"info"])] == b"d1:xli1ei2eee"
    assert data[slice(*spans[b"a"])] == b"i1e"
    assert data[slice(*spans[b"z"])] == b"3:abc"


@pytest.mark.parametrize("bad", [b"", b"li1ee", b"d1:ai1e", b"d1:bi1e1:ai2ee", b"de1", b"di1ei2ee",
                                 b"d1:ai01ee"])
def test_spans_refuse_what_the_decoder_refuses(bad):
    with pytest.raises(BencodeError):
        decode_with_spans_untrusted(bad)


def test_spans_keep_the_depth_limit():
    deep = b"d1:a" + b"l" * 20 + b"e" * 20 + b"e"
    with pytest.raises(BencodeError, match="nesting"):
        decode_with_spans_untrusted(deep, max_depth=8)
    assert decode_with_spans_untrusted(deep, max_depth=32)[0][b"a"] is not None


_bvalues = st.recursive(st.integers(-10**20, 10**20) | st.binary(max_size=20),
                        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.binary(max_size=6), ch, max_size=4),
                        max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.binary(max_size=8), _bvalues, max_size=6))
def test_spans_property(d):
    data = encode(d)
    value, spans = decode_with_spans_untrusted(data, max_depth=64)
    assert value == d and set(spans) == set(d)
    for k, (a, b) in spans.items():
        assert data[a:b] == encode(d[k])


# ---- well-formed torrents -----------------------------------------------------------------


def test_single_file_torrent():
    info = _single(40000)
    data = _torrent(info, announce=b"http://127.0.0.1:6969/announce", comment=b"hi",
                    creation_date=1700000000)
    m = parse_metainfo_untrusted(data)
    assert m.info_hash == hashlib.sha1(encode(info)).digest()
    assert m.info_bytes == encode(info)
    assert (m.name, m.total_length, m.piece_length, m.num_pieces) == ("file.bin", 40000, 16384, 3)
    assert [f.path for f in m.files] == [("file.bin",)]
    assert not m.multi_file and not m.private and not m.hybrid
    assert m.trackers == (("http://127.0.0.1:6969/announce",),)
    assert (m.comment, m.creation_date) == ("hi", 1700000000)
    assert [m.piece_size(i) for i in range(3)] == [16384, 16384, 40000 - 32768]
    assert m.piece_hash(2) == bytes(range(20))
    with pytest.raises(IndexError):
        m.piece_hash(3)


def test_infohash_covers_keys_we_do_not_know():
    # An unknown key in info (a newer creator's) is part of the hashed
    # bytes: the hash is over the info dictionary exactly as written.
    info = _single(100)
    raw = encode(info)[:-1] + b"1:~i7ee"
    data = b"d4:info" + raw + b"e"
    m = parse_metainfo_untrusted(data)
    assert m.info_hash == hashlib.sha1(raw).digest()


def test_multi_file_torrent_with_pad_files_attributes_and_tiers():
    files = [
        {b"length": 20000, b"path": [b"a", b"one.bin"]},
        {b"length": 12768, b"path": [b".pad", b"12768"], b"attr": b"p"},
        {b"length": 0, b"path": [b"empty"]},
        {b"length": 5000, b"path": [b"run.sh"], b"attr": b"xh?"},
        {b"length": 100, b"path": [b"link"], b"attr": b"l", b"symlink path": [b"a", b"one.bin"]},
    ]
    info = _multi(files)
    info[b"private"] = 1
    tiers = [[b"udp://127.0.0.1:1"], [], [b"http://127.0.0.1:2/a", b"http://127.0.0.1:3/a"]]
    m = parse_metainfo_untrusted(_torrent(info, announce=b"udp://127.0.0.1:9", announce_list=tiers))
    assert m.multi_file and m.private
    assert [f.path for f in m.files] == [("dir", "a", "one.bin"), ("dir", ".pad", "12768"), ("dir", "empty"),
                                          ("dir", "run.sh"), ("dir", "link")]
    assert [f.offset for f in m.files] == [0, 20000, 32768, 32768, 37768]
    pad, run, link = m.files[1], m.files[3], m.files[4]
    assert pad.pad and not pad.executable
    assert run.executable and run.hidden and run.attr == "hx"     # unknown letters dropped
    assert link.symlink and link.symlink_path == ("a", "one.bin")
    # announce-list wins over announce (BEP 12); the empty tier carries nothing
    assert m.trackers == (("udp://127.0.0.1:1",), ("http://127.0.0.1:2/a", "http://127.0.0.1:3/a"))
    # piece 1: the tail of one.bin and the pad file; piece 2 skips the
    # empty file and holds run.sh and link
    assert [(s.file_index, s.file_offset, s.length) for s in m.map_piece(1)] == \
        [(0, 16384, 3616), (1, 0, 12768)]
    assert [(s.file_index, s.file_offset, s.length) for s in m.map_piece(2)] == [(3, 0, 5000), (4, 0, 100)]
    assert [(s.file_index, s.file_offset, s.length) for s in m.map_range(19000, 3000)] == \
        [(0, 19000, 1000), (1, 0, 2000)]
    assert list(m.file_pieces(0)) == [0, 1] and list(m.file_pieces(2)) == [] and list(m.file_pieces(3)) == [2]


def test_utf8_name_variant_is_preferred_and_bad_utf8_is_replaced():
    info = _single(10, name=b"caf\xe9")
    info[b"name.utf-8"] = "café".encode()
    assert parse_metainfo_untrusted(_torrent(info)).name == "café"
    assert parse_metainfo_untrusted(_torrent(_single(10, name=b"caf\xe9"))).name == "caf\ufffd"


def test_hybrid_records_the_v2_hash_and_v2_only_is_refused():
    info = _single(40000, piece_length=16384)
    info[b"meta version"] = 2
    info[b"file tree"] = {b"file.bin": {b"": {b"length": 40000, b"pieces root": b"\x02" * 32}}}
    m = parse_metainfo_untrusted(_torrent(info, piece_layers={}))
    assert m.hybrid and m.info_hash_v2 == hashlib.sha256(encode(info)).digest()
    assert m.info_hash == hashlib.sha1(encode(info)).digest()
    # v1 and v2 sides that disagree are refused (BEP 52)
    info[b"file tree"] = {b"file.bin": {b"": {b"length": 39999, b"pieces root": b"\x02" * 32}}}
    with pytest.raises(MetainfoError, match=r"^info\.file tree: does not describe the same files"):
        parse_metainfo_untrusted(_torrent(info))
    info[b"file tree"] = {b"file.bin": {b"": b"x"}}
    with pytest.raises(MetainfoError, match=r"^info\.file tree/file\.bin: expected a dictionary, got a string"):
        parse_metainfo_untrusted(_torrent(info))
    del info[b"pieces"]
    with pytest.raises(MetainfoError, match=r"^info\.pieces: missing \(a v2-only torrent"):
        parse_metainfo_untrusted(_torrent(info))


def test_info_alone_as_from_a_magnet_link_and_back_to_a_torrent():
    info = _multi([{b"length": 20000, b"path": [b"a"]}, {b"length": 100, b"path": [b"b"]}])
    raw = encode(info)
    m = parse_info_untrusted(raw, trackers=[["udp://127.0.0.1:1"], [], ["udp://127.0.0.1:2"]])
    assert m.info_hash == hashlib.sha1(raw).digest() and m.info_bytes == raw
    assert m.trackers == (("udp://127.0.0.1:1",), ("udp://127.0.0.1:2",))
    back = parse_metainfo_untrusted(m.to_torrent_bytes())
    assert back == m                 # every field, the info bytes included
    with pytest.raises(MetainfoError, match=r"^info: not valid bencode"):
        parse_info_untrusted(raw[:-1])
    with pytest.raises(MetainfoError, match=r"^info\.pieces: length 3"):
        parse_info_untrusted(encode({**info, b"pieces": b"abc"}))


def test_to_torrent_bytes_keeps_every_field():
    data = _torrent(_single(40000), announce=b"http://127.0.0.1/a", comment=b"c", created_by=b"me",
                    creation_date=5, announce_list=[[b"http://127.0.0.1/a"]], url_list=[b"http://127.0.0.1/w"])
    m = parse_metainfo_untrusted(data)
    assert m.to_torrent_bytes() == data


# ---- malformed torrents: one line naming the field ----------------------------------------


def _bad(mutate):
    info = _multi([{b"length": 20000, b"path": [b"a"]}, {b"length": 100, b"path": [b"b"]}])
    top = {b"info": info, b"announce": b"http://127.0.0.1/"}
    mutate(top, info)
    return encode(top)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, i: i.__setitem__(b"pieces", b"x" * 41), "info.pieces: length 41 is not a multiple of 20"),
    (lambda t, i: i.__setitem__(b"pieces", b"x" * 20), "info.pieces: 1 hashes for 2 pieces"),
    (lambda t, i: t.pop(b"info"), "info: missing"),
    (lambda t, i: t.__setitem__(b"info", [1]), "info: expected a dictionary, got a list"),
    (lambda t, i: i.pop(b"name"), "info.name: missing"),
    (lambda t, i: i.__setitem__(b"name", 5), "info.name: expected a string, got an integer"),
    (lambda t, i: i.__setitem__(b"piece length", 0), "info.piece length: 0 is outside"),
    (lambda t, i: i.__setitem__(b"piece length", b"16384"), "info.piece length: expected an integer"),
    (lambda t, i: i.__setitem__(b"length", 5), "info: needs exactly one of 'length'"),
    (lambda t, i: i.pop(b"files"), "info: needs exactly one of 'length'"),
    (lambda t, i: i.__setitem__(b"files", []), "info.files: empty list"),
    (lambda t, i: i[b"files"].__setitem__(1, b"x"), "info.files[1]: expected a dictionary, got a string"),
    (lambda t, i: i[b"files"][1].__setitem__(b"length", -1), "info.files[1].length: negative length -1"),
    (lambda t, i: i[b"files"][1].pop(b"length"), "info.files[1].length: missing"),
    (lambda t, i: i[b"files"][0].__setitem__(b"path", [b"a", 3]), r"info.files[0].path[1]: expected a string"),
    (lambda t, i: i[b"files"][1].__setitem__(b"path", [b"a"]), "info.files[1].path: 'dir/a' is also info.files[0]"),
    (lambda t, i: i[b"files"][1].__setitem__(b"path", [b"a", b"b"]), "info.files[1].path: 'dir/a/b' lies under info.files[0], which is a file"),
    (lambda t, i: i[b"files"].insert(0, {b"length": 1, b"path": [b"a", b"b"]}),
     "info.files[1].path: 'dir/a' is also a directory of another file"),
    (lambda t, i: i.__setitem__(b"meta version", 3), "info.meta version: unsupported version 3"),
    (lambda t, i: i.__setitem__(b"meta version", 0), "info.meta version: unsupported version 0"),
    (lambda t, i: t.__setitem__(b"announce-list", [b"x"]), "announce-list[0]: expected a list, got a string"),
    (lambda t, i: t.__setitem__(b"announce", 1), "announce: expected a string, got an integer"),
    (lambda t, i: i[b"files"][0].__setitem__(b"length", 0) or i[b"files"][1].__setitem__(b"length", 0),
     "info: the torrent holds no data"),
])
def test_malformed_torrent_names_the_field(mutate, message):
    with pytest.raises(MetainfoError) as ei:
        parse_metainfo_untrusted(_bad(mutate))
    text = str(ei.value)
    assert text.startswith(message), text
    assert "\n" not in text
    assert isinstance(ei.value, RemoteProtocolError) and isinstance(ei.value, ProtocolError)


def test_not_bencode_and_oversized_inputs():
    with pytest.raises(MetainfoError, match="^torrent: not valid bencode"):
        parse_metainfo_untrusted(b"<html>")
    with pytest.raises(MetainfoError, match="^torrent: not valid bencode"):
        parse_metainfo_untrusted(_torrent(_single()) + b"x")


# ---- path security ------------------------------------------------------------------------


@pytest.mark.parametrize("path, why", [
    ([b".."], "unsafe path component '..'"),
    ([b"a", b"..", b"..", b"etc"], "unsafe path component '..'"),
    ([b"."], "unsafe path component '.'"),
    ([b"a", b""], "unsafe path component ''"),
    ([], "empty path"),
    ([b"/etc/passwd"], "contains a '/'"),
    ([b"a/../../b"], "contains a '/'"),
    ([b"..\\..\\win.ini"], "contains a '\\'"),
    ([b"C:", b"x"], "is a drive letter"),
    ([b"c:evil"], "is a drive letter"),
    ([b"a\x00b"], "contains a NUL byte"),
    ([b"x" * 256], "longer than 255 bytes"),
])
def test_paths_that_could_escape_are_refused_naming_the_file(path, why):
    info = _multi([{b"length": 10, b"path": [b"ok"]}, {b"length": 10, b"path": path}])
    with pytest.raises(MetainfoError) as ei:
        parse_metainfo_untrusted(_torrent(info))
    assert str(ei.value).startswith("info.files[1].path: ")
    assert why in str(ei.value)


@pytest.mark.parametrize("name", [b"..", b".", b"", b"/abs", b"D:", b"a\\b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(MetainfoError, match=r"^info\.name: "):
        parse_metainfo_untrusted(_torrent(_single(10, name=name)))


def test_unsafe_symlink_target_is_refused():
    info = _multi([{b"length": 10, b"path": [b"l"], b"attr": b"l", b"symlink path": [b"..", b"x"]}])
    with pytest.raises(MetainfoError, match=r"^info\.files\[0\]\.symlink path: unsafe path component"):
        parse_metainfo_untrusted(_torrent(info))


def test_pad_files_may_share_a_path():
    files = [{b"length": 10, b"path": [b"a"]}, {b"length": 16374, b"path": [b".pad", b"16374"], b"attr": b"p"},
             {b"length": 10, b"path": [b"b"]}, {b"length": 16374, b"path": [b".pad", b"16374"], b"attr": b"p"},
             {b"length": 10, b"path": [b"c"]}]
    m = parse_metainfo_untrusted(_torrent(_multi(files)))
    assert sum(f.pad for f in m.files) == 2


# ---- fuzzing ------------------------------------------------------------------------------

_VALID = _torrent(_multi([{b"length": 20000, b"path": [b"a", b"b"]}, {b"length": 7, b"path": [b"c"], b"attr": b"x"}]),
                  announce=b"udp://127.0.0.1:1")

_leaf = st.one_of(st.integers(-3, 70000), st.binary(max_size=45),
                  st.sampled_from([b"..", b"", b"a", b"p", b"l", b"/", b"C:"]))
_keys = st.sampled_from([b"info", b"name", b"length", b"files", b"path", b"pieces", b"piece length",
                         b"announce", b"announce-list", b"private", b"attr", b"meta version", b"file tree",
                         b"symlink path", b"name.utf-8", b"path.utf-8", b"x"])
_values = st.recursive(_leaf, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                    st.dictionaries(_keys, ch, max_size=6)), max_leaves=30)


def _parse_or_our_error(data: bytes) -> None:
    try:
        m = parse_metainfo_untrusted(data)
    except MetainfoError as exc:
        assert "\n" not in str(exc)
        return
    # What parses is consistent.
    assert m.num_pieces == -(-m.total_length // m.piece_length)
    assert sum(f.length for f in m.files) == m.total_length


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _parse_or_our_error(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=5), st.dictionaries(_keys, _values, max_size=8))
def test_fuzz_structured_dictionaries(top, info):
    top = dict(top)
    top[b"info"] = info
    _parse_or_our_error(encode(top))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_fuzz_mutations_of_a_valid_torrent(pos, byte, cut):
    data = bytearray(_VALID)
    data[pos] = byte
    _parse_or_our_error(bytes(data))
    _parse_or_our_error(_VALID[:cut])
