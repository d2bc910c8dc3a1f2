"""aria2 JSON-RPC conformance of `bt daemon` (bt.rpc), in process: the real
daemon (bt.rpc.daemon.serve_daemon, as `bt daemon` runs it) on a loopback
port, driven over HTTP POST, HTTP GET (base64 params) and WebSocket, with
and without --rpc-secret.  Every method of issue 11 is called; answers are
compared with what aria2c 1.36 returns (field names, numbers as strings,
error codes and messages, HTTP statuses)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

import bt
from bt.rpc.daemon import daemon_args, serve_daemon
from testsupport import bt_content

PIECE = 16 * 1024
SECRET = "s3cret-token"
METHODS = ["aria2.addUri", "aria2.addTorrent", "aria2.remove", "aria2.forceRemove",
           "aria2.pause", "aria2.pauseAll", "aria2.unpause", "aria2.unpauseAll",
           "aria2.tellStatus", "aria2.getFiles", "aria2.getPeers", "aria2.getUris",
           "aria2.tellActive", "aria2.tellWaiting", "aria2.tellStopped", "aria2.changePosition",
           "aria2.getOption", "aria2.changeOption", "aria2.getGlobalOption",
           "aria2.changeGlobalOption", "aria2.getGlobalStat", "aria2.purgeDownloadResult",
           "aria2.removeDownloadResult", "aria2.getVersion", "aria2.getSessionInfo",
           "aria2.shutdown", "aria2.forceShutdown", "aria2.saveSession", "system.multicall",
           "system.listMethods", "system.listNotifications"]
NUMERIC = ("totalLength", "completedLength", "uploadLength", "downloadSpeed", "uploadSpeed",
           "numSeeders", "connections", "numPieces", "pieceLength")


class Failed(Exception):
    def __init__(self, error: dict, status: int | None = None) -> None:
        super().__init__(error.get("message"))
        self.code = error.get("code")
        self.message = error.get("message")
        self.status = status


class Client:
    """One RPC client over "http" or "ws"; adds the token when given."""

    def __init__(self, base: str, transport: str, secret: str | None) -> None:
        self.base = base
        self.transport = transport
        self.secret = secret
        self.n = 0
        self.http = httpx.AsyncClient(timeout=10)
        self.ws = None
        self.notifications: list[dict] = []

    def params(self, params):
        return ([f"token:{self.secret}"] if self.secret is not None else []) + list(params)

    async def raw(self, req: dict) -> tuple[dict, int | None]:
        if self.transport == "http":
            r = await self.http.post(self.base + "/jsonrpc", content=json.dumps(req))
            return r.json(), r.status_code
        await self.ws.send_message(json.dumps(req))
        while True:
            msg = json.loads(await self.ws.get_message())
            if "method" in msg and "id" not in msg:
                self.notifications.append(msg)
                continue
            return msg, None

    async def call(self, method: str, *params, token: bool = True):
        self.n += 1
        req = {"jsonrpc": "2.0", "id": f"q{self.n}", "method": method,
               "params": self.params(params) if token else list(params)}
        answer, status = await self.raw(req)
        assert answer["id"] == req["id"] and answer["jsonrpc"] == "2.0", answer
        if "error" in answer:
            raise Failed(answer["error"], status)
        assert status in (None, 200)
        return answer["result"]


async def start_daemon(nursery, tmp_path, *extra: str) -> tuple[str, object, object]:
    """The daemon on an ephemeral loopback port; returns its base URL, the
    args (for the session file paths) and what it reported (bt.rpc.daemon.Running)."""
    args = daemon_args("-d", str(tmp_path / "dl"), "--bind", "127.0.0.1",
                       "--rpc-listen", "127.0.0.1:0", *extra)
    running = await nursery.start(lambda task_status: serve_daemon(args, task_status=task_status))
    return running.url, args, running


def _torrent(tmp_path, name="content", sizes=(100_000, 50_000, 7)):
    src, names, data = bt_content(tmp_path / name, sizes, name=name, piece_length=PIECE)
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _client(base, transport, secret, stack):
    c = Client(base, transport, secret)
    if transport == "ws":
        c.ws = await stack.enter_async_context(open_websocket_url(base.replace("http", "ws") + "/jsonrpc"))
    return c


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "secret"])
@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_every_method(tmp_path, transport, secret):
    import contextlib
    extra = ("--rpc-secret", secret) if secret else ()
    extra += ("--save-session", str(tmp_path / "session.txt"))
    data_a = _torrent(tmp_path, "alpha")
    data_b = _torrent(tmp_path, "beta", (30_000,))
    async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
        base, _, running = await start_daemon(nursery, tmp_path, *extra)
        c = await _client(base, transport, secret, stack)
        assert sorted(await c.call("system.listMethods", token=False)) == sorted(
            m for m in (await c.call("system.listMethods")))
        assert set(METHODS) <= set(await c.call("system.listMethods"))
        assert await c.call("system.listNotifications") == [
            "aria2.onDownloadStart", "aria2.onDownloadPause", "aria2.onDownloadStop",
            "aria2.onDownloadComplete", "aria2.onDownloadError", "aria2.onBtDownloadComplete"]
        version = await c.call("aria2.getVersion")
        assert "BitTorrent" in version["enabledFeatures"] and version["version"]
        sid = (await c.call("aria2.getSessionInfo"))["sessionId"]
        assert len(sid) == 40 and int(sid, 16) >= 0

        gid_a = await c.call("aria2.addTorrent", _b64(data_a), [], {"dir": str(tmp_path / "a")})
        gid_b = await c.call("aria2.addTorrent", _b64(data_b))
        assert len(gid_a) == 16 and int(gid_a, 16) and gid_a != gid_b
        st = await c.call("aria2.tellStatus", gid_a)
        assert st["gid"] == gid_a and st["status"] == "active"
        for k in NUMERIC:
            assert isinstance(st[k], str) and st[k].isdigit(), (k, st[k])
        meta = bt.parse_metainfo_untrusted(data_a)
        assert st["totalLength"] == str(meta.total_length) and st["completedLength"] == "0"
        assert st["infoHash"] == meta.info_hash.hex() and st["pieceLength"] == str(PIECE)
        assert st["numPieces"] == str(meta.num_pieces)
        assert st["bitfield"] == "00" * ((meta.num_pieces + 7) // 8)
        assert st["dir"] == str(tmp_path / "a")
        assert st["bittorrent"]["info"]["name"] == "alpha" and st["bittorrent"]["mode"] == "multi"
        assert st["bittorrent"]["announceList"] == []
        assert st["seeder"] == "false" and "errorCode" not in st
        assert await c.call("aria2.tellStatus", gid_a, ["gid", "status"]) == \
            {"gid": gid_a, "status": "active"}
        files = await c.call("aria2.getFiles", gid_a)
        # indexes count every file of the torrent (as aria2's do), BEP 47 pads not listed
        assert [f["index"] for f in files] == [str(n) for n, f in enumerate(meta.files, 1)
                                               if not f.pad]
        assert len(files) == 3
        assert files[0] == {"index": "1", "path": str(tmp_path / "a" / "alpha" / "file0.bin"),
                            "length": "100000", "completedLength": "0", "selected": "true",
                            "uris": []}
        assert await c.call("aria2.getPeers", gid_a) == []
        assert await c.call("aria2.getUris", gid_a) == []
        assert {d["gid"] for d in await c.call("aria2.tellActive")} == {gid_a, gid_b}
        assert [d["gid"] for d in await c.call("aria2.tellActive", ["gid"])] == [gid_a, gid_b]

        # pause, waiting queue, positions
        assert await c.call("aria2.pause", gid_a) == gid_a
        with pytest.raises(Failed, match=f"GID#{gid_a} cannot be paused now"):
            await c.call("aria2.pause", gid_a)
        assert await c.call("aria2.pauseAll") == "OK"
        waiting = await c.call("aria2.tellWaiting", 0, 10, ["gid", "status"])
        assert waiting == [{"gid": gid_a, "status": "paused"}, {"gid": gid_b, "status": "paused"}]
        assert await c.call("aria2.changePosition", gid_b, 0, "POS_SET") == 0
        assert [d["gid"] for d in await c.call("aria2.tellWaiting", 0, 10)] == [gid_b, gid_a]
        assert [d["gid"] for d in await c.call("aria2.tellWaiting", -1, 1)] == [gid_a]
        assert await c.call("aria2.changePosition", gid_b, 1, "POS_CUR") == 1
        assert await c.call("aria2.changePosition", gid_b, -1, "POS_END") == 0
        assert await c.call("aria2.tellActive") == []
        assert await c.call("aria2.unpause", gid_a) == gid_a
        with pytest.raises(Failed, match="cannot be unpaused now"):
            await c.call("aria2.unpause", gid_a)
        assert await c.call("aria2.unpauseAll") == "OK"
        assert len(await c.call("aria2.tellActive")) == 2

        # options
        opt = await c.call("aria2.getOption", gid_a)
        assert opt["dir"] == str(tmp_path / "a")
        assert await c.call("aria2.changeOption", gid_a, {"max-download-limit": "100K"}) == "OK"
        assert (await c.call("aria2.getOption", gid_a))["max-download-limit"] == "100K"
        # applied: the torrent's own limit, under the session's global one
        torrent = running.api.session.torrent_by_gid(gid_a)
        assert torrent.limits.download == 100 * 1024 and torrent.limits.upload is None
        assert torrent.limits.parent is running.api.session.limits
        with pytest.raises(Failed, match="max-download-limit"):
            await c.call("aria2.changeOption", gid_a, {"max-download-limit": "fast"})
        glob = await c.call("aria2.getGlobalOption")
        assert glob["dir"] == str(tmp_path / "dl") and glob["max-overall-download-limit"] == "0"
        assert await c.call("aria2.changeGlobalOption", {"max-overall-download-limit": "1M"}) == "OK"
        assert (await c.call("aria2.getGlobalOption"))["max-overall-download-limit"] == "1M"
        with pytest.raises(Failed) as e:
            await c.call("aria2.changeGlobalOption", {"max-overall-download-limit": "xx"})
        assert e.value.message == ("We encountered a problem while processing the option "
                                   "'--max-overall-download-limit'.")
        stat = await c.call("aria2.getGlobalStat")
        assert stat["numActive"] == "2" and stat["numWaiting"] == "0" and stat["numStopped"] == "0"
        assert set(stat) == {"downloadSpeed", "uploadSpeed", "numActive", "numWaiting",
                             "numStopped", "numStoppedTotal"}

        # session file
        assert await c.call("aria2.saveSession") == "OK"
        text = (tmp_path / "session.txt").read_text()
        assert f" gid={gid_a}" in text and f" gid={gid_b}" in text

        # multicall (each call carries its own token)
        calls = [{"methodName": "aria2.tellStatus", "params": c.params([gid_a, ["gid"]])},
                 {"methodName": "aria2.tellStatus", "params": c.params(["0123456789abcdef"])}]
        assert await c.call("system.multicall", calls, token=False) == [
            [{"gid": gid_a}], {"code": 1, "message": "GID 0123456789abcdef is not found"}]

        # remove, stopped results
        assert await c.call("aria2.remove", gid_a) == gid_a
        assert await c.call("aria2.forceRemove", gid_b) == gid_b
        with pytest.raises(Failed, match=f"Active Download not found for GID#{gid_a}"):
            await c.call("aria2.remove", gid_a)
        stopped = await c.call("aria2.tellStopped", 0, 10)
        assert [(d["gid"], d["status"], d["errorCode"]) for d in stopped] == [
            (gid_a, "removed", "31"), (gid_b, "removed", "31")]
        assert stopped[0]["downloadSpeed"] == "0"
        assert (await c.call("aria2.getGlobalStat"))["numStoppedTotal"] == "2"
        assert await c.call("aria2.removeDownloadResult", gid_a) == "OK"
        with pytest.raises(Failed, match=f"GID {gid_a} is not found"):
            await c.call("aria2.tellStatus", gid_a)
        assert await c.call("aria2.purgeDownloadResult") == "OK"
        assert await c.call("aria2.tellStopped", 0, 10) == []

        # magnets and what a BitTorrent client does not do
        with pytest.raises(Failed, match="BitTorrent only"):
            await c.call("aria2.addUri", ["http://127.0.0.1:1/file.iso"])
        with pytest.raises(Failed, match="BitTorrent only"):
            await c.call("aria2.changeUri", gid_b, 1, [], [])

        # shutdown answers, then the daemon ends by itself (the nursery exits)
        kind = "aria2.forceShutdown" if transport == "ws" else "aria2.shutdown"
        assert await c.call(kind) == "OK"
        await stack.aclose()
        # (the nursery waits for the daemon to end by itself)
    assert (tmp_path / "session.txt").exists()


async def test_errors_as_aria2(tmp_path):
    """The error answers and HTTP statuses of aria2c 1.36."""
    async with trio.open_nursery() as nursery:
        base, _, _ = await start_daemon(nursery, tmp_path, "--rpc-secret", SECRET,
                                     "--rpc-max-request-size", "100000")
        url = base + "/jsonrpc"
        async with httpx.AsyncClient(timeout=10) as h:
            async def post(body):
                r = await h.post(url, content=body)
                return r.status_code, r.json()
            tok = f"token:{SECRET}"
            assert await post('{"jsonrpc":"2.0","id":1,"method":"aria2.tellStatus",'
                              '"params":["0123456789abcdef"]}') == \
                (400, {"id": 1, "jsonrpc": "2.0", "error": {"code": 1, "message": "Unauthorized"}})
            assert (await post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "aria2.tellStatus",
                                          "params": ["token:wrong", "0123456789abcdef"]})))[1][
                "error"]["message"] == "Unauthorized"
            assert await post('{bad') == (500, {"id": None, "jsonrpc": "2.0", "error": {
                "code": -32700, "message": "Parse error."}})
            cases = [
                (["0123456789abcdef"], "GID 0123456789abcdef is not found"),
                (["zz"], "Invalid GID zz"),
                ([5], "The parameter at 0 has wrong type."),
                ([], "The parameter at 0 is required but missing."),
            ]
            for params, message in cases:
                st, a = await post(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "aria2.tellStatus",
                                               "params": [tok, *params]}))
                assert (st, a["error"]) == (400, {"code": 1, "message": message}), params
            st, a = await post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "aria2.nosuch",
                                           "params": [tok]}))
            assert a["error"] == {"code": 1, "message": "No such method: aria2.nosuch"}
            st, a = await post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "aria2.tellWaiting",
                                           "params": [tok, "0", 5]}))
            assert a["error"]["message"] == "The parameter at 0 has wrong type."
            st, a = await post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "aria2.addTorrent",
                                           "params": [tok, "not base64!"]}))
            assert st == 400 and "base64" in a["error"]["message"]
            st, a = await post(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "aria2.addTorrent",
                                           "params": [tok, _b64(b"d4:infoi3ee")]}))
            assert st == 400 and a["error"]["message"].startswith("cannot add the torrent: ")
            # no id: aria2 answers Invalid Request (it has no notifications)
            assert await post('{"jsonrpc":"2.0","method":"aria2.getVersion"}') == (400, {
                "id": None, "jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request."}})
            st, a = await post('{"jsonrpc":"2.0","id":3,"method":"aria2.getVersion","params":{}}')
            assert a["error"]["code"] == -32602
            # batches
            assert await post("[]") == (200, [])
            st, a = await post(json.dumps([
                {"jsonrpc": "2.0", "id": 1, "method": "aria2.getGlobalStat", "params": [tok]},
                {"jsonrpc": "2.0", "id": 2, "method": "aria2.getGlobalStat", "params": []}, 3]))
            assert st == 200 and [x.get("id") for x in a] == [1, 2, None]
            assert "result" in a[0] and a[1]["error"]["message"] == "Unauthorized"
            assert a[2]["error"]["code"] == -32600
            # a body over the limit, in the header and without it (chunked)
            r = await h.post(url, content=b"[" + b" " * 200_000 + b"]")
            assert r.status_code == 413 and r.json()["error"]["code"] == -32600

            async def chunks():
                for _ in range(30):
                    yield b" " * 10_000
            # (the server answers 413 and closes while the client may still be
            # sending: the client sees the answer or the closed connection)
            try:
                r = await h.post(url, content=chunks())
            except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
                pass
            else:
                assert r.status_code == 413
            # public methods answer without the token
            r = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "system.listNotifications"})
            assert r.status_code == 200
            # multicall checks each call's token
            r = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "system.multicall",
                                        "params": [[{"methodName": "aria2.getGlobalStat", "params": []},
                                                    {"methodName": "system.multicall", "params": [[]]}]]})
            assert r.json()["result"] == [{"code": 1, "message": "Unauthorized"},
                                          {"code": 1, "message": "Recursive system.multicall forbidden."}]
            # other paths
            assert (await h.get(base + "/nothing")).status_code == 404
            # still serving after all that
            r = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "aria2.getGlobalStat",
                                        "params": [tok]})
            assert r.status_code == 200 and r.json()["result"]["numActive"] == "0"
        nursery.cancel_scope.cancel()


async def test_get_with_base64_params(tmp_path):
    """aria2's GET form: params as base64 JSON, JSONP with jsoncallback."""
    async with trio.open_nursery() as nursery:
        base, _, _ = await start_daemon(nursery, tmp_path, "--rpc-secret", SECRET)
        url = base + "/jsonrpc"
        p = base64.b64encode(json.dumps([f"token:{SECRET}"]).encode()).decode()
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.get(url, params={"method": "aria2.getGlobalStat", "id": "g1", "params": p})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json-rpc"
            assert r.json()["id"] == "g1" and r.json()["result"]["numActive"] == "0"
            r = await h.get(url, params={"method": "aria2.getVersion", "id": "g2", "params": p,
                                         "jsoncallback": "cb"})
            assert r.headers["content-type"] == "text/javascript"
            assert r.text.startswith('cb({"id":"g2"') and r.text.endswith("})")
            r = await h.get(url, params={"method": "aria2.getVersion", "id": "g3"})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Unauthorized"
            r = await h.get(url, params={"method": "aria2.getVersion", "id": "g4", "params": "%%%"})
            assert r.status_code == 500 and r.json()["error"]["code"] == -32700
            # URL-safe base64 without padding
            p2 = base64.urlsafe_b64encode(json.dumps([f"token:{SECRET}", "0123456789abcdef",
                                                      ["gid"]]).encode()).decode().rstrip("=")
            r = await h.get(url, params={"method": "aria2.tellStatus", "id": 5, "params": p2})
            assert r.json()["error"]["message"] == "GID 0123456789abcdef is not found"
        nursery.cancel_scope.cancel()


async def test_websocket_notifications_and_limits(tmp_path):
    """Every WebSocket client gets aria2's notifications; clients over the
    cap are refused; a client that never reads is dropped, the others and
    the download go on; a message over the size limit closes its socket."""
    data = _torrent(tmp_path, "gamma", (40_000,))
    async with trio.open_nursery() as nursery:
        base, _, _ = await start_daemon(nursery, tmp_path, "--max-ws-clients", "3",
                                     "--rpc-max-request-size", "50000")
        ws_url = base.replace("http", "ws") + "/jsonrpc"
        async with open_websocket_url(ws_url) as a, open_websocket_url(ws_url) as b:
            c = Client(base, "ws", None)
            c.ws = a
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(ws_url) as third, open_websocket_url(ws_url):
                    await third.get_message()
            gid = await c.call("aria2.addTorrent", _b64(data))
            await c.call("aria2.pause", gid)
            await c.call("aria2.unpause", gid)
            await c.call("aria2.remove", gid)
            want = [("aria2.onDownloadStart", gid), ("aria2.onDownloadPause", gid),
                    ("aria2.onDownloadStart", gid), ("aria2.onDownloadStop", gid)]
            got_b = []
            with trio.fail_after(10):
                while len(got_b) < len(want):
                    got_b.append(json.loads(await b.get_message()))
                while len(c.notifications) < len(want):
                    c.notifications.append(json.loads(await a.get_message()))
            for got in (got_b, c.notifications):
                assert [(m["method"], m["params"][0]["gid"]) for m in got] == want
                assert all(m["jsonrpc"] == "2.0" and "id" not in m for m in got)
            # an oversized message closes that socket only
            await b.send_message("[" + " " * 60_000 + "]")
            with trio.fail_after(10):
                with pytest.raises(Exception):
                    while True:
                        await b.get_message()
            assert await c.call("aria2.getGlobalStat")
        nursery.cancel_scope.cancel()


async def test_slow_websocket_client_is_dropped(tmp_path):
    """A client that stops reading is dropped once its queue is full (and
    its connection closed when it answers no ping for the read timeout);
    the daemon keeps answering others."""
    from bt.rpc.aria2 import NOTIFICATIONS
    from bt.rpc.jsonrpc import Dispatcher
    from bt.rpc.server import RpcServer
    server = RpcServer(Dispatcher({}, notifications=NOTIFICATIONS), ws_queue=8,
                       ping_interval=0.5, read_timeout=2, send_timeout=2)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, "127.0.0.1", 0)
        ws_url = bound[0].replace("http", "ws") + "/jsonrpc"
        async with open_websocket_url(ws_url) as slow, open_websocket_url(ws_url) as fast:
            with trio.fail_after(5):
                while len(server.clients) < 2:
                    await trio.sleep(0.01)
            got = 0
            big = "x" * 8192                # 5,000 of these: far more than socket buffers hold
            for n in range(5_000):
                server.broadcast("aria2.onDownloadStart", f"{n:016x}{big}")
                if n % 4 == 3:
                    while got < n - 2:      # the fast one keeps up
                        await fast.get_message()
                        got += 1
                    await trio.sleep(0)
                if server.counters["ws.dropped_slow"]:
                    break
            assert server.counters["ws.dropped_slow"] == 1
            with trio.fail_after(10):
                while len(server.clients) > 1:
                    await trio.sleep(0.01)
            await fast.send_message('{"jsonrpc":"2.0","id":1,"method":"system.listNotifications"}')
            with trio.fail_after(10):
                while True:
                    m = json.loads(await fast.get_message())
                    if m.get("id") == 1:
                        break
            assert m["result"] == list(NOTIFICATIONS)
            with trio.fail_after(15):          # the slow one's connection is closed
                while server.counters["ws.ended"] < 1:
                    await trio.sleep(0.05)
            assert len(server.clients) == 1
            del slow
        nursery.cancel_scope.cancel()


@pytest.mark.interop
async def test_answers_match_aria2c(tmp_path):
    """The same requests to aria2c 1.36 (Debian `aria2`, on loopback, no
    DHT/LPD/PEX) and to our daemon: identical error answers and HTTP
    statuses, and for a paused torrent the same tellStatus/getFiles
    fields (ours may add some, never lack one) with the same values where
    they do not depend on the implementation."""
    import shutil
    import socket
    import subprocess
    from testsupport import unavailable
    aria2c = shutil.which("aria2c")
    if aria2c is None:
        unavailable("aria2c is not installed (Debian aria2)", ".ci/run installs aria2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = _torrent(tmp_path, "cmp", (70_000, 20_000))
    adir = tmp_path / "aria2"
    adir.mkdir()
    proc = subprocess.Popen([aria2c, "--enable-rpc", f"--rpc-listen-port={port}",
                             f"--rpc-secret={SECRET}", f"--dir={adir}", "--enable-dht=false",
                             "--enable-dht6=false", "--bt-enable-lpd=false",
                             "--enable-peer-exchange=false", "--rpc-listen-all=false",
                             "--no-conf", "--quiet"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as h:
            ours, _, _ = await start_daemon(nursery, tmp_path, "--rpc-secret", SECRET)
            theirs = f"http://127.0.0.1:{port}"
            with trio.fail_after(20):
                while True:
                    try:
                        await h.post(theirs + "/jsonrpc", content=b"{}")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
            tok = f"token:{SECRET}"

            async def both(body: str):
                a = await h.post(theirs + "/jsonrpc", content=body)
                b = await h.post(ours + "/jsonrpc", content=body)
                return (a.status_code, a.json()), (b.status_code, b.json())

            def req(method, *params, rid=1):
                return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                   "params": list(params)})
            same = [
                "{bad", "[]", '{"jsonrpc":"2.0","method":"aria2.getVersion"}',
                req("aria2.tellStatus", "0123456789abcdef"),
                req("aria2.tellStatus", "token:nope", "0123456789abcdef"),
                req("aria2.tellStatus", tok, "0123456789abcdef"),
                req("aria2.tellStatus", tok, 5), req("aria2.tellStatus", tok),
                req("aria2.pause", tok, "fedcba9876543210"),
                req("aria2.nosuch", tok), req("aria2.getGlobalStat"),
                req("aria2.tellActive", tok), req("aria2.tellWaiting", tok, 0, 10),
                req("aria2.tellStopped", tok, 0, 10),
                req("aria2.changeGlobalOption", tok, {"max-overall-download-limit": "xx"}),
                req("aria2.changeGlobalOption", tok, {"max-overall-upload-limit": "2M"}),
                req("system.listNotifications"),
                req("system.multicall", [{"methodName": "aria2.tellActive", "params": [tok]},
                                         {"methodName": "aria2.getGlobalStat", "params": []}]),
            ]
            for body in same:
                a, b = await both(body)
                assert a == b, body
            stat_a, stat_b = await both(req("aria2.getGlobalStat", tok))
            assert stat_a == stat_b
            # a paused torrent in both
            b64 = _b64(data)
            (_, ga), (_, gb) = await both(req("aria2.addTorrent", tok, b64, [], {"pause": "true"}))
            assert "result" in ga and "result" in gb, (ga, gb)
            ga, gb = ga["result"], gb["result"]
            # a second copy: aria2 queues it and fails it when it starts; we refuse
            # it at once, with aria2's message
            dup = (await h.post(ours + "/jsonrpc", content=req("aria2.addTorrent", tok, b64))).json()
            info_hash = bt.parse_metainfo_untrusted(data).info_hash.hex()
            assert dup["error"] == {"code": 1, "message": f"InfoHash {info_hash} is already registered."}
            sa = (await h.post(theirs + "/jsonrpc", content=req("aria2.tellStatus", tok, ga))).json()["result"]
            sb = (await h.post(ours + "/jsonrpc", content=req("aria2.tellStatus", tok, gb))).json()["result"]
            assert set(sa) - set(sb) == set(), (sorted(sa), sorted(sb))
            # (aria2 reports totalLength 0 for a torrent paused before it started)
            for k in ("status", "infoHash", "pieceLength", "numPieces",
                      "connections", "uploadLength", "numSeeders", "downloadSpeed"):
                assert sa[k] == sb[k], k
            assert sa["bittorrent"]["info"] == sb["bittorrent"]["info"]
            assert sa["bittorrent"]["mode"] == sb["bittorrent"]["mode"]
            assert sa["bittorrent"]["announceList"] == sb["bittorrent"]["announceList"]
            # aria2 lists BEP 47 pad files (".pad/N"); we leave them out, same indexes
            real = [f for f in sa["files"] if "/.pad/" not in f["path"]]
            assert len(real) == len(sb["files"]) == 2
            for fa, fb in zip(real, sb["files"]):
                assert set(fa) == set(fb)
                assert (fa["index"], fa["length"], fa["selected"], fa["uris"]) == \
                    (fb["index"], fb["length"], fb["selected"], fb["uris"])
                assert fa["path"].replace(str(adir), "") == fb["path"].replace(str(tmp_path / "dl"), "")
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_restart_with_the_session_file(tmp_path):
    """--save-session, then a new daemon with --input-file: every download
    is back with its gid, directory, paused state and data (a seed stays
    complete); aria2.addTorrent's .torrent is kept next to the file."""
    session_file = tmp_path / "bt.session"
    seed_data = _torrent(tmp_path, "seeded", (50_000,))       # its files are in tmp/seeded/src
    other = _torrent(tmp_path, "other", (20_000,))
    async with httpx.AsyncClient(timeout=10) as h:
        async def call(base, method, *params):
            r = await h.post(base + "/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                      "params": [f"token:{SECRET}", *params]})
            return r.json()["result"]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                base, _, _ = await start_daemon(nursery, tmp_path, "--rpc-secret", SECRET,
                                             "--save-session", str(session_file))
                g1 = await call(base, "aria2.addTorrent", _b64(seed_data), [],
                                {"dir": str(tmp_path / "seeded" / "src")})
                g2 = await call(base, "aria2.addTorrent", _b64(other), [], {"pause": "true"})
                before = {d["gid"]: d for d in await call(base, "aria2.tellActive")
                          + await call(base, "aria2.tellWaiting", 0, 10)}
                assert before[g1]["completedLength"] == before[g1]["totalLength"] != "0"
                assert await call(base, "aria2.shutdown") == "OK"
            text = session_file.read_text()
            assert f" gid={g1}" in text and f" gid={g2}" in text and " pause=true" in text
            saved = sorted((tmp_path / "bt.session.torrents").iterdir())
            assert len(saved) == 2
            async with trio.open_nursery() as nursery:
                base, _, _ = await start_daemon(nursery, tmp_path, "--rpc-secret", SECRET,
                                             "--input-file", str(session_file),
                                             "--save-session", str(session_file))
                active = await call(base, "aria2.tellActive", ["gid", "status", "dir",
                                                                "completedLength", "totalLength"])
                waiting = await call(base, "aria2.tellWaiting", 0, 10, ["gid", "status", "dir"])
                assert active == [{"gid": g1, "status": "active", "dir": str(tmp_path / "seeded" / "src"),
                                   "completedLength": before[g1]["totalLength"],
                                   "totalLength": before[g1]["totalLength"]}]
                assert waiting == [{"gid": g2, "status": "paused", "dir": str(tmp_path / "dl")}]
                nursery.cancel_scope.cancel()


async def test_daemon_runs_hooks(tmp_path):
    """--on-download-start / --on-download-pause run with aria2's arguments
    (gid, number of files, first file's path)."""
    import os
    import stat
    script = tmp_path / "hook.sh"
    out = tmp_path / "hook.out"
    script.write_text(f'#!/bin/sh\necho "$0 $1 $2 $3" >> {out}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    data = _torrent(tmp_path, "hooked", (10_000,))
    async with trio.open_nursery() as nursery:
        base, _, _ = await start_daemon(nursery, tmp_path, "--on-download-start", str(script),
                                     "--on-download-pause", str(script))
        c = Client(base, "http", None)
        gid = await c.call("aria2.addTorrent", _b64(data))
        await c.call("aria2.pause", gid)
        first = os.path.join(tmp_path / "dl", "hooked", "file0.bin")
        with trio.fail_after(20):
            while not out.exists() or len(out.read_text().splitlines()) < 2:
                await trio.sleep(0.05)
        assert out.read_text().splitlines() == [f"{script} {gid} 1 {first}"] * 2
        nursery.cancel_scope.cancel()


def test_session_file_parsing():
    """aria2's input-file format: URIs (tab-separated mirrors: the first
    is used), indented options, comments; an option before any URI is an
    error naming its line."""
    from bt.rpc.sessionfile import parse_session
    entries = parse_session("# saved\n/a/x.torrent\n gid=0123456789abcdef\n\tdir=/d\n\n"
                            "magnet:?xt=urn:btih:" + "ab" * 20 + "\thttp://mirror\n pause=true\n")
    assert [(e.uri, e.options) for e in entries] == [
        ("/a/x.torrent", {"gid": "0123456789abcdef", "dir": "/d"}),
        ("magnet:?xt=urn:btih:" + "ab" * 20, {"pause": "true"})]
    with pytest.raises(ValueError, match="line 1"):
        parse_session(" gid=0123456789abcdef\n")
    with pytest.raises(ValueError, match="line 2: expected key=value"):
        parse_session("/x.torrent\n nonsense\n")


async def test_dispatcher_without_a_server():
    """The JSON-RPC layer alone: bytes in, bytes out."""
    from bt.rpc.jsonrpc import Dispatcher, RpcError

    async def echo(p):
        return [p.get(0, str), p.get(1, int, 7)]

    async def boom(p):
        raise RpcError("nope")
    d = Dispatcher({"t.echo": echo, "t.boom": boom}, secret="k")
    a = await d.handle(b'{"jsonrpc":"2.0","id":"x","method":"t.echo","params":["token:k","a"]}')
    assert (a.status, json.loads(a.body)) == (200, {"id": "x", "jsonrpc": "2.0", "result": ["a", 7]})
    a = await d.handle(b'{"jsonrpc":"2.0","id":1,"method":"t.echo","params":["token:k","a",true]}')
    assert json.loads(a.body)["error"] == {"code": 1, "message": "The parameter at 1 has wrong type."}
    a = await d.handle(b'{"jsonrpc":"2.0","id":1,"method":"t.boom","params":["token:k"]}')
    assert (a.status, json.loads(a.body)["error"]) == (400, {"code": 1, "message": "nope"})
    a = await d.handle(b'{"jsonrpc":"2.0","id":1,"method":"t.nosuch","params":[]}')
    assert json.loads(a.body)["error"]["message"] == "Unauthorized"       # no hint without the token
    a = await d.handle(b"[" * 100_000)
    assert a.status == 500 and json.loads(a.body)["error"]["code"] == -32700


async def test_magnet_two_steps_bookkeeping(tmp_path):
    """The RPC layer's side of a magnet link, against a session double
    shaped as the magnet work's interface (``add_torrent("magnet:?...")``
    returns a torrent with ``has_metadata`` False in state ``metadata``):
    the metadata step's gid and struct, then -- once the metadata is in --
    the step complete with ``followedBy``, the real download ``following``
    it, aria2's notifications, tellStopped/tellActive and the session file.
    (The end-to-end path with a real session: test_bt_rpc_aria2p.py.)"""
    from bt.rpc.aria2 import Aria2Api
    from bt.rpc.jsonrpc import Params
    from bt.rpc.sessionfile import render_session
    from bt.wire import Geometry

    data = _torrent(tmp_path, "magnetic", (40_000,))
    meta = bt.parse_metainfo_untrusted(data)

    class Meter:
        total = 0

    class Picker:
        num_have = 0

        def has_piece(self, i):
            return False

    class MagnetTorrent:
        def __init__(self, info_hash):
            self.info_hash, self.gid, self.name = info_hash, "00000000000000aa", "magnetic"
            self.has_metadata, self.state, self.meta = False, "metadata", None
            self.peers, self.error, self.up = set(), None, Meter()
            self._down_rate = self._up_rate = 0.0
            self.finished = False
            self.own_limits: dict = {}

        def set_limits(self, **limits):
            self.own_limits.update(limits)

        def learn(self):
            self.has_metadata, self.state, self.meta = True, "downloading", meta
            self.geometry = Geometry(meta.total_length, meta.piece_length)
            self.picker = Picker()

    class Session:
        download_dir = str(tmp_path / "dl")
        torrents: dict = {}

        async def add_torrent(self, source, *, save_path, gid, paused=False):
            assert source.startswith("magnet:?") and gid is None
            self.torrent = MagnetTorrent(meta.info_hash)
            self.torrents[meta.info_hash] = self.torrent
            return self.torrent

    session = Session()
    api = Aria2Api(session)
    notes = []
    api.notify = lambda method, gid: notes.append((method, gid))
    uri = f"magnet:?xt=urn:btih:{meta.info_hash.hex()}&dn=magnetic"
    step = await api._add_uri(Params([[uri]]))
    assert step != session.torrent.gid and notes == [("aria2.onDownloadStart", step)]
    st = await api._tell_status(Params([step]))
    assert (st["status"], st["totalLength"], st["infoHash"]) == ("active", "0", meta.info_hash.hex())
    assert st["files"][0]["path"] == "[METADATA]magnetic" and "followedBy" not in st
    text, files = render_session(api, str(tmp_path / "s"))
    assert f"{uri}\n" in text and f" gid={step}" in text and files == {}

    session.torrent.learn()
    real = session.torrent.gid
    assert api.event_gid(session.torrent) == real          # the notifier's START names it
    assert notes[1:] == [("aria2.onDownloadComplete", step)]
    st = await api._tell_status(Params([step]))
    assert (st["status"], st["followedBy"], st["errorCode"]) == ("complete", [real], "0")
    rt = await api._tell_status(Params([real]))
    assert (rt["following"], rt["totalLength"]) == (step, str(meta.total_length))
    assert rt["bittorrent"]["info"]["name"] == "magnetic" and rt["status"] == "active"
    assert [d["gid"] for d in await api._tell_active(Params([]))] == [real]
    assert [d["gid"] for d in await api._tell_stopped(Params([0, 10]))] == [step]
    text, files = render_session(api, str(tmp_path / "s"))
    assert f" gid={real}" in text and uri not in text
    assert list(files.values()) == [b"d4:info" + meta.info_bytes + b"e"]


async def test_the_download_queue(tmp_path):
    """aria2's max-concurrent-downloads: past the limit a download waits
    (status "waiting", its torrent added paused: no peers, no start
    event); a slot freed by a pause or a removal starts the next in queue
    order; unpause puts a download back in the queue; raising the limit
    starts the waiting ones; a bad limit is aria2's option error."""
    datas = [_torrent(tmp_path, f"q{n}", (40_000 + n,)) for n in range(3)]
    async with trio.open_nursery() as nursery:
        base, _, running = await start_daemon(nursery, tmp_path, "-j", "1")
        c = Client(base, "http", None)
        gids = [await c.call("aria2.addTorrent", _b64(d)) for d in datas]

        async def statuses():
            return [(await c.call("aria2.tellStatus", g, ["status"]))["status"] for g in gids]
        assert await statuses() == ["active", "waiting", "waiting"]
        assert [d["gid"] for d in await c.call("aria2.tellWaiting", 0, 10)] == gids[1:]
        session = running.api.session
        assert [session.torrent_by_gid(g).status().state for g in gids] == \
            ["downloading", "paused", "paused"]
        assert (await c.call("aria2.getGlobalStat"))["numWaiting"] == "2"
        # a pause frees the slot: the first waiting one starts
        await c.call("aria2.pause", gids[0])
        assert await statuses() == ["paused", "active", "waiting"]
        # unpause queues it behind the one still waiting
        await c.call("aria2.unpause", gids[0])
        assert await statuses() == ["waiting", "active", "waiting"]
        # a removal frees the slot for the next waiting one in queue order
        # (the order of the downloads, which changePosition changes):
        # gids[0] before gids[2]
        await c.call("aria2.remove", gids[1])
        assert await statuses() == ["active", "removed", "waiting"]
        with pytest.raises(Failed, match="max-concurrent-downloads"):
            await c.call("aria2.changeGlobalOption", {"max-concurrent-downloads": "0"})
        assert await c.call("aria2.changeGlobalOption", {"max-concurrent-downloads": "5"}) == "OK"
        assert await statuses() == ["active", "removed", "active"]
        await c.call("aria2.shutdown")
