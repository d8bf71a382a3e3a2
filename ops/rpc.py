"""The RPC transport every role uses: coordinator <-> workers, worker <-> worker.

Threads and blocking sockets, no asyncio. A frame is a 4-byte big-endian length and a
msgpack body; messages are ``[0, msgid, method, params]`` (request),
``[1, msgid, error_or_None, result]`` (response, ``error = [type_name, message]``) and
``[2, method, params]`` (notification, no reply). Nothing is ever pickled: bodies are
unpacked by msgpack with every length bounded by the frame limit, and only after the peer
has passed a mutual HMAC-SHA256 challenge-response over a shared secret (the handshake
frames are raw bytes, so nothing from an unauthenticated peer is even unpacked).

TLS is optional (``ssl_context=``: a context, or a callable giving the context to use for
each new connection, as :class:`ops.tls.MutualTls` does to rotate certificates). With TLS,
the TLS handshake (client certificate required by the server's context) completes before
the server sends or reads any frame, and the shared-secret handshake then runs inside TLS.
A server logs a refused TLS handshake once per peer host, not per attempt. msgpack arrays
come back as lists (tuples do not survive).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import msgpack

from engine.errors import AuthError, ConfigError, DStreamError, FrameTooLarge, RpcError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ConnectionLost",
    "Peer",
    "RemoteError",
    "RpcClient",
    "RpcServer",
    "RpcTimeout",
    "SslContextSource",
    "connect",
    "make_ssl_contexts",
]

log = logging.getLogger(__name__)

#: Default frame limit. A shuffle block or a replicated input block travels in one frame;
#: blocks are cut per batch interval and stay well below this, while the limit still caps
#: what one peer can make another allocate.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: Handshake frames are 36, 64 and 32 bytes; 1 KiB leaves room and bounds what an
#: unauthenticated peer can make the server allocate.
HANDSHAKE_MAX_FRAME = 1024
#: An unauthenticated peer is dropped after this long. Loopback and LAN handshakes take
#: milliseconds; 5 s tolerates a loaded machine and a TLS handshake yet stops idle or slow
#: connections from holding a thread.
HANDSHAKE_TIMEOUT = 5.0
#: After the handshake, an idle connection is fine (reads retry), but a frame half-read or a
#: send blocked for this long means the peer is wedged: the connection is dropped. 60 s moves
#: a 64 MiB frame at ~1 MB/s and exceeds heartbeat-based failure detection, so the
#: coordinator declares a worker lost before the transport does.
IO_TIMEOUT = 60.0
#: Connecting is a single loopback/LAN round trip; 5 s covers a restarting peer's backlog.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: A call's default deadline: longer than any single task-control RPC should take, short
#: enough that a lost reply surfaces as RpcTimeout within a few batch intervals of retries.
DEFAULT_CALL_TIMEOUT = 30.0
#: Handler threads per server; slow calls do not block others until this many run at once.
DEFAULT_HANDLER_THREADS = 16
#: A response that cannot go on for this long (its caller stopped reading: paused, wedged)
#: is cut and the connection dropped, so it holds a handler thread this long, not
#: ``IO_TIMEOUT``: a few paused callers of large answers (block fetches) would otherwise
#: take the whole pool, and the server would stop answering everyone. Progress resets it.
RESPONSE_STALL_S = 2.0
#: Requests of one connection queued or running at once; beyond this the server stops
#: reading that connection, so TCP pushes back on a flooding peer instead of memory growing.
MAX_IN_FLIGHT = 64
#: Peer hosts whose refused TLS handshake a server remembers, so that it logs the refusal
#: of each once: a misconfigured peer retrying every second does not flood the log, and a
#: scan from many addresses cannot grow the set without bound (the oldest are forgotten).
MAX_REFUSED_PEERS = 1024

#: What ``ssl_context=`` takes: a fixed context, or a callable returning the context for
#: each new connection (called once per connection, before the TLS handshake).
SslContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

_MAGIC = b"DSR1"
_NONCE = 32
_HEADER = struct.Struct(">I")
_REQUEST, _RESPONSE, _NOTIFY = 0, 1, 2
_SMALL = 64 * 1024  # bodies up to this size are sent in one write together with the header
_SEND_CHUNK = 256 * 1024  # a send bounded by a stall limit writes at most this much at a time
#: A call's connect and handshake take at most its timeout, but never less than this (a TLS
#: handshake on a loaded machine can take a good part of a second)
CONNECT_FLOOR_S = 1.0
_TLS_CHUNK = 256 * 1024  # plaintext encrypted (and ciphertext read) per step


class RemoteError(RpcError):
    """The remote handler raised; carries its exception type name and message only."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"remote {type_name}: {message}")


class RpcTimeout(RpcError):
    """No response arrived within the call's timeout (the connection stays usable)."""


class ConnectionLost(RpcError):
    """The connection is closed or dropped; the next call on a client reconnects."""


def _check_config(secret: bytes, allow_insecure: bool, max_frame: int) -> None:
    if not isinstance(secret, bytes | bytearray):
        msg = f"RPC secret must be bytes, got {type(secret).__name__}"
        raise ConfigError(msg)
    if not secret and not allow_insecure:
        msg = "RPC secret is empty: set DSTREAM_SECRET (or pass allow_insecure=True)"
        raise ConfigError(msg)
    if not HANDSHAKE_MAX_FRAME <= max_frame < 2**32:
        msg = f"max_frame must be in [{HANDSHAKE_MAX_FRAME}, 2**32), got {max_frame}"
        raise ConfigError(msg)


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def make_ssl_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Build fixed ``(server_ctx, client_ctx)`` for mutual TLS from PEM files.

    Both sides present ``cert``/``key`` and verify the other against ``ca`` (TLS 1.2+,
    chain verified, host name not checked: see :func:`ops.tls.server_context`). The fleet
    uses :class:`ops.tls.MutualTls` instead, which also reloads rotated files.
    """
    from ops.tls import TlsFiles, client_context, server_context

    files = TlsFiles(cert, key, ca)
    return server_context(files), client_context(files)


def _context(source: SslContextSource | None) -> ssl.SSLContext | None:
    """The context for a connection being made now (see :data:`SslContextSource`)."""
    if source is None or isinstance(source, ssl.SSLContext):
        return source
    return source()


class _Conn:
    """One framed plain socket. Sends are serialized by a lock; one thread reads."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.peername: Any = sock.getpeername()
        self._send_lock = threading.Lock()
        self.in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)  # server side only
        self.closed = False
        #: the peer's certificate (DER) once a TLS handshake verified it; None without TLS
        self.peer_cert: bytes | None = None

    def _write(self, header: bytes, body: bytes, stall_s: float | None) -> None:
        # called with _send_lock held
        if len(body) <= _SMALL:
            self._sendall(header + body, stall_s)
        else:  # no concatenation copy of a large body
            self._sendall(header, stall_s)
            self._sendall(body, stall_s)

    def _sendall(self, data: bytes | memoryview, stall_s: float | None) -> None:
        """``sendall``; with *stall_s*, TimeoutError once no byte could go for that long.

        A peer that stopped reading (paused, wedged) fills the socket buffers, and a plain
        ``sendall`` then blocks for the socket's ``IO_TIMEOUT``: a call's own timeout must
        bound that too. Progress resets the limit, so a long send that moves is not cut.
        """
        if stall_s is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while view:
            if not poller.poll(max(1, int(stall_s * 1000))):
                msg = f"no byte could be sent for {stall_s:g} s"
                raise TimeoutError(msg)
            view = view[self.sock.send(view[:_SEND_CHUNK]) :]

    def _read_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def send_raw(self, body: bytes, stall_s: float | None = None) -> None:
        """Send one frame; raise FrameTooLarge before sending anything if it is oversize.

        With *stall_s*, a send that cannot go on for that long raises RpcTimeout; the frame
        is cut short, so the connection is dropped (the next call reconnects).
        """
        if len(body) > self.max_frame:
            raise FrameTooLarge(len(body), self.max_frame)
        try:
            with self._send_lock:
                self._write(_HEADER.pack(len(body)), body, stall_s)
        except (OSError, ssl.SSLError) as exc:  # includes TimeoutError
            self.shutdown()
            if stall_s is not None and isinstance(exc, TimeoutError):
                msg = f"send to {self.peername} stalled ({exc}): the connection is dropped"
                raise RpcTimeout(msg) from exc
            msg = f"send to {self.peername} failed: {exc!r}"
            raise ConnectionLost(msg) from exc

    def send(self, message: list[Any], stall_s: float | None = None) -> None:
        self.send_raw(msgpack.packb(message, use_bin_type=True, datetime=False), stall_s)

    def _fill(self, view: memoryview, idle_ok: bool) -> bool:
        """Fill *view* from the socket; False on a clean EOF before the first byte."""
        got = 0
        while got < len(view):
            try:
                n = self._read_into(view[got:])
            except TimeoutError:
                if idle_ok and got == 0 and not self.closed:
                    continue  # an idle connection is fine
                raise
            if n == 0:
                if got == 0 and idle_ok:
                    return False
                msg = f"{self.peername} closed the connection mid-frame"
                raise ConnectionLost(msg)
            got += n
        return True

    def recv_raw(self, limit: int | None = None, idle_ok: bool = True) -> bytearray | None:
        """Read one frame body; None on a clean EOF. The limit is checked before the body."""
        header = bytearray(_HEADER.size)
        if not self._fill(memoryview(header), idle_ok):
            return None
        (size,) = _HEADER.unpack(header)
        limit = self.max_frame if limit is None else limit
        if size > limit:
            raise FrameTooLarge(size, limit)
        body = bytearray(size)
        self._fill(memoryview(body), idle_ok=False)
        return body

    def recv(self) -> Any:
        body = self.recv_raw()
        if body is None:
            return None
        n = self.max_frame
        return msgpack.unpackb(
            body,
            raw=False,
            # peers are authenticated before any body is unpacked, and engine messages
            # carry int-keyed maps (partition ids), so non-str keys are allowed.
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
        )

    def shutdown(self) -> None:
        """Wake the reader and any blocked sender; the reading thread closes the socket."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _TlsConn(_Conn):
    """TLS over memory BIOs, so one reader and many writers can share a connection.

    ``ssl.SSLSocket`` breaks when one thread reads while another writes (measured: records
    get corrupted under concurrent calls). Here the TLS object is only touched under
    ``_tls_lock`` for in-memory work; socket I/O happens outside it. Ciphertext is always
    drained and sent under ``_send_lock`` (taken before ``_tls_lock``), so records leave in
    the order they were made.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_frame: int,
        ctx: ssl.SSLContext,
        server_side: bool,
        hostname: str | None = None,
    ) -> None:
        super().__init__(sock, max_frame)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=hostname
        )
        self._tls_lock = threading.Lock()

    def handshake(self) -> None:
        """Run the TLS handshake (before any other thread uses the connection).

        Raises:
            ssl.SSLError: the handshake failed (e.g. the peer's certificate does not verify);
                the TLS alert saying why has been sent to the peer, best effort.
            ConnectionLost: the peer closed the connection during the handshake.
            OSError: the socket failed or timed out.

        """
        while True:
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert, so the peer learns why it is refused
                raise
            self._flush()
            if done:
                self.peer_cert = self._tls.getpeercert(binary_form=True)
                return
            if not self._pull():
                msg = f"{self.peername} closed the connection during the TLS handshake"
                raise ConnectionLost(msg)

    def _pull(self) -> bool:
        data = self.sock.recv(_TLS_CHUNK)
        if not data:
            return False
        with self._tls_lock:
            self._in.write(data)
        return True

    def _flush(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                out = self._out.read()
            if out:
                self.sock.sendall(out)

    def _write(self, header: bytes, body: bytes, stall_s: float | None) -> None:
        # called with _send_lock held
        view = memoryview(body)
        for start in range(0, max(len(view), 1), _TLS_CHUNK):
            with self._tls_lock:
                if start == 0:
                    self._tls.write(header)
                if view:
                    self._tls.write(view[start : start + _TLS_CHUNK])
                out = self._out.read()
            self._sendall(out, stall_s)

    def _read_into(self, view: memoryview) -> int:
        while True:
            with self._tls_lock:
                try:  # with a buffer, read() returns a count (typeshed says bytes)
                    n: int = cast(int, self._tls.read(len(view), view))
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0
                pending = self._out.pending
            if pending:  # reading produced TLS records to send back (e.g. key update)
                self._flush()
            if n >= 0:
                return n
            if not self._pull():
                return 0


class Peer:
    """The remote end of a server connection, as handlers see it."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.address: tuple[str, int] = (conn.peername[0], conn.peername[1])

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def certificate(self) -> bytes | None:
        """The peer's TLS certificate (DER), verified against the CA; None without TLS."""
        return self._conn.peer_cert

    def notify(self, method: str, params: Any = None) -> None:
        """Push a notification to this peer (thread-safe); ConnectionLost if it is gone."""
        if self._conn.closed:
            msg = f"peer {self.address} is disconnected"
            raise ConnectionLost(msg)
        self._conn.send([_NOTIFY, method, params])

    def __repr__(self) -> str:
        return f"Peer({self.address[0]}:{self.address[1]})"


def _prepare_socket(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RpcServer:
    """Accepts authenticated connections and runs ``handler(method, params, peer)``.

    One accept thread, one reader thread per connection, and a shared pool of
    ``handler_threads`` threads running requests, so a slow call does not block other calls
    on the same connection. A handler's return value is the response; a handler exception
    goes back as ``[type_name, message]`` (the traceback is logged here at warning level,
    never sent). Notifications from clients also reach the handler; their result is dropped.
    Handlers that call back into a peer which calls this server again can exhaust the pool.
    """

    def __init__(
        self,
        handler: Callable[[str, Any, Peer], Any],
        *,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame: int = DEFAULT_MAX_FRAME,
        ssl_context: SslContextSource | None = None,
        allow_insecure: bool = False,
        name: str = "rpc",
        handler_threads: int = DEFAULT_HANDLER_THREADS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        _check_config(secret, allow_insecure, max_frame)
        self._handler = handler
        self._secret = bytes(secret)
        self._max_frame = max_frame
        self._ssl = ssl_context
        self._name = name
        self._handler_threads = handler_threads
        self._handshake_timeout = handshake_timeout
        self._bind = (host, port)
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, _Conn | None] = {}
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False
        self._refused: OrderedDict[str, None] = OrderedDict()  # guarded by _lock
        self._refusals = 0

    @property
    def tls_refusals(self) -> int:
        """Connections refused in the TLS handshake so far (every attempt counts)."""
        return self._refusals

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; valid after :meth:`start`."""
        if self._listener is None:
            msg = f"{self._name} server is not started"
            raise RpcError(msg)
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> RpcServer:
        """Bind, listen and start accepting. Binds with SO_REUSEADDR (restart on a port)."""
        self._listener = socket.create_server(self._bind, reuse_port=False, backlog=128)
        self._pool = ThreadPoolExecutor(self._handler_threads, thread_name_prefix=self._name)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self._name}-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, wait for threads. Idempotent.

        Clients with pending calls see ConnectionLost at once; running handlers are waited
        for (their responses are dropped).
        """
        with self._lock:
            if self._stopping or self._listener is None:
                return
            self._stopping = True
            conns = [c for c in self._conns.values() if c is not None]
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._listener, socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._listener.close()
        for conn in conns:
            conn.shutdown()
        with self._lock:
            threads = list(self._conns)
        for thread in threads:
            thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.5)  # backstop: shutdown() wakes accept on Linux
        while not self._stopping:
            try:
                sock, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping:
                    return
                log.exception("%s: accept failed", self._name)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.name = f"{self._name}-conn-{thread.name}"
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._conns[thread] = None
            thread.start()

    def _handshake(self, conn: _Conn) -> bool:
        server_nonce = os.urandom(_NONCE)
        conn.send_raw(_MAGIC + server_nonce)
        answer = conn.recv_raw(HANDSHAKE_MAX_FRAME, idle_ok=False)
        if answer is None or len(answer) != 2 * _NONCE:
            log.warning("%s: dropped %s: malformed handshake", self._name, conn.peername)
            return False
        client_nonce, mac = bytes(answer[:_NONCE]), bytes(answer[_NONCE:])
        if not hmac.compare_digest(mac, _mac(self._secret, b"client", server_nonce, client_nonce)):
            log.warning("%s: dropped %s: authentication failed", self._name, conn.peername)
            return False
        conn.send_raw(_mac(self._secret, b"server", client_nonce, server_nonce))
        return True

    def _serve(self, sock: socket.socket) -> None:
        me = threading.current_thread()
        conn: _Conn | None = None
        try:
            _prepare_socket(sock)
            sock.settimeout(self._handshake_timeout)
            ctx = _context(self._ssl)
            if ctx is None:
                conn = _Conn(sock, self._max_frame)
            else:
                conn = _TlsConn(sock, self._max_frame, ctx, server_side=True)
            with self._lock:
                if self._stopping:
                    return
                self._conns[me] = conn
            if isinstance(conn, _TlsConn):
                try:
                    conn.handshake()
                except (OSError, RpcError) as exc:  # ssl.SSLError and timeouts are OSErrors
                    if not conn.closed:  # not the server stopping
                        self._refuse(conn.peername, exc)
                    return
            if not self._handshake(conn):
                return
            sock.settimeout(IO_TIMEOUT)
            peer = Peer(conn)
            while not conn.closed:
                message = conn.recv()
                if message is None:
                    return
                self._dispatch(conn, peer, message)
        except Exception as exc:  # any peer or protocol failure drops only this peer
            if not (conn is not None and conn.closed):
                who = conn.peername if conn is not None else "?"
                log.warning("%s: dropped %s: %r", self._name, who, exc)
        finally:
            if conn is not None:
                conn.shutdown()
            sock.close()
            with self._lock:
                if not self._stopping:
                    self._conns.pop(me, None)

    def _refuse(self, peername: Any, exc: BaseException) -> None:
        """Count a refused TLS handshake; log it unless its host was refused before.

        The last :data:`MAX_REFUSED_PEERS` refused hosts are remembered; the host, not the
        ``(host, port)`` pair, since a retrying peer comes from a new port each time.
        """
        host = str(peername[0]) if isinstance(peername, tuple) else str(peername)
        with self._lock:
            self._refusals += 1
            first = host not in self._refused
            self._refused[host] = None
            self._refused.move_to_end(host)
            while len(self._refused) > MAX_REFUSED_PEERS:
                self._refused.popitem(last=False)
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or str(exc)
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"{reason}: {exc.verify_message}"
        elif isinstance(exc, TimeoutError):
            reason = f"no TLS handshake within {self._handshake_timeout} s (a plaintext client?)"
        else:
            reason = str(exc) or repr(exc)
        if "ALERT" in str(reason).upper():  # the peer sent the alert: it refused us
            hint = "the peer refused our certificate (does it trust our CA?)"
        else:
            hint = "this peer needs a certificate from the fleet's CA (DSTREAM_TLS_*)"
        if first:
            log.warning(
                "%s: refused %s: TLS handshake failed (%s); %s. Further refusals of %s are "
                "not logged",
                self._name,
                peername,
                reason,
                hint,
                host,
            )
        else:
            log.debug("%s: refused %s again: %s", self._name, peername, reason)

    def _dispatch(self, conn: _Conn, peer: Peer, message: Any) -> None:
        if isinstance(message, list) and len(message) == 4 and message[0] == _REQUEST:
            _, msgid, method, params = message
        elif isinstance(message, list) and len(message) == 3 and message[0] == _NOTIFY:
            (_, method, params), msgid = message, None
        else:
            method = None
        if not isinstance(method, str):
            msg = f"malformed message from {peer.address}"
            raise RpcError(msg)
        assert self._pool is not None
        while not conn.in_flight.acquire(timeout=0.1):
            if conn.closed:
                return
        try:
            self._pool.submit(self._run, conn, peer, msgid, method, params)
        except RuntimeError:  # pool shut down: the server is stopping
            conn.shutdown()

    def _run(self, conn: _Conn, peer: Peer, msgid: Any, method: str, params: Any) -> None:
        try:
            if not conn.closed:  # a request queued before its peer left is not run
                self._respond(conn, peer, msgid, method, params)
        finally:
            conn.in_flight.release()

    def _respond(self, conn: _Conn, peer: Peer, msgid: Any, method: str, params: Any) -> None:
        error: list[str] | None = None
        result: Any = None
        try:
            result = self._handler(method, params, peer)
        except DStreamError as exc:  # an answer the caller handles (not leader, fenced...)
            log.debug("%s: %r refused: %s", self._name, method, exc)
            error = [type(exc).__name__, str(exc)]
        except Exception as exc:
            log.warning("%s: handler of %r raised", self._name, method, exc_info=True)
            error = [type(exc).__name__, str(exc)]
        if msgid is None or conn.closed:
            return
        try:
            try:
                conn.send([_RESPONSE, msgid, error, result], RESPONSE_STALL_S)
            except (FrameTooLarge, TypeError, ValueError) as exc:  # oversize or unpackable
                log.warning("%s: cannot send result of %r: %s", self._name, method, exc)
                conn.send([_RESPONSE, msgid, [type(exc).__name__, str(exc)], None])
        except RpcTimeout as exc:  # the caller stopped reading: dropped, the thread freed
            log.info("%s: answer to %r cut: %s", self._name, method, exc)
        except RpcError:
            pass  # connection gone: the client sees ConnectionLost


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: RpcError | None = None
        self.result: Any = None


class RpcClient:
    """A thread-safe client multiplexing concurrent calls over one connection.

    Connects lazily on the first call and again on the first call after the connection
    dropped, so a worker survives a coordinator restart. A reader thread matches responses
    to calls by msgid and runs ``on_notify(method, params)`` for server notifications; it
    runs on that reader thread, so it must be quick and must not make calls on this client.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        secret: bytes,
        max_frame: int = DEFAULT_MAX_FRAME,
        ssl_context: SslContextSource | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        on_notify: Callable[[str, Any], None] | None = None,
        allow_insecure: bool = False,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        _check_config(secret, allow_insecure, max_frame)
        if isinstance(address, str):
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit():
                msg = f"RPC address must be 'host:port', got {address!r}"
                raise ConfigError(msg)
            address = (host.strip("[]"), int(port))
        self.address = address
        self._secret = bytes(secret)
        self._max_frame = max_frame
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._on_notify = on_notify
        self._lock = threading.Lock()  # guards _pending and _conn
        self._connect_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self._active = 0  # calls and notifications in progress (guarded by _connect_lock)
        self._last_used = time.monotonic()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (a dropped connection is not ``closed``)."""
        return self._closed

    @property
    def connected(self) -> bool:
        """True while the client holds an open connection."""
        conn = self._conn
        return conn is not None and not conn.closed

    @property
    def last_used(self) -> float:
        """``time.monotonic()`` when the last call ended (or when the client was made)."""
        return self._last_used

    def disconnect_if_idle(self, idle_s: float, now: float | None = None) -> bool:
        """Close the connection if no call is in progress and none ended in *idle_s*.

        The client stays usable: the next call reconnects (a connection pool closes idle
        connections this way, :class:`ops.worker.peers.PeerPool`). Atomic with respect to
        calls: a call either started before (the connection is kept) or opens a new one.
        Returns True when a connection was closed. Does not wait for the reader thread to
        finish (it does at once, on the shutdown; the next connection joins it first).
        """
        now = time.monotonic() if now is None else now
        with self._connect_lock:
            conn = self._conn
            if self._active or conn is None or conn.closed or now - self._last_used < idle_s:
                return False
            conn.shutdown()
        return True

    def reset(self) -> bool:
        """Drop the connection, calls in progress or not; the next call reconnects.

        For a connection whose path went dead (a network partition): TCP retransmits on it
        with a backoff that, after 20 s, waits several seconds more once the path is back,
        while a fresh connection is made at the next call. Pending calls fail at once with
        ConnectionLost. True when a connection was dropped.
        """
        with self._connect_lock:
            conn = self._conn
            if conn is None or conn.closed:
                return False
            conn.shutdown()
        return True

    def call(self, method: str, params: Any = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Call *method* and return its result.

        Raises:
            RemoteError: the handler raised (type name and message only).
            RpcTimeout: no answer in *timeout* seconds (a late answer is dropped), or the
                request could not be sent on for that long (the connection is dropped).
            ConnectionLost: the connection dropped (pending calls fail at once, not at their
                timeout) or cannot be made; the next call reconnects.
            FrameTooLarge: the request exceeds ``max_frame``; nothing was sent.
            AuthError: the server rejected the secret or failed to prove it knows it.

        """
        conn = self._connection(claim=True, timeout=timeout)
        msgid = next(self._ids)
        pending = _Pending()
        with self._lock:
            self._pending[msgid] = pending
        try:
            # the send too is bounded: a peer that stopped reading cannot hold it longer
            conn.send([_REQUEST, msgid, method, params], stall_s=timeout)
            if not pending.done.wait(timeout):
                msg = f"{method!r} to {self.address} got no answer in {timeout} s"
                raise RpcTimeout(msg)
        except BaseException:
            with self._lock:
                self._pending.pop(msgid, None)
            raise
        finally:
            self._release()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (no reply, no delivery guarantee beyond the socket)."""
        conn = self._connection(claim=True)
        try:
            conn.send([_NOTIFY, method, params])
        finally:
            self._release()

    def close(self) -> None:
        """Close the connection and fail pending calls with ConnectionLost. Idempotent."""
        with self._connect_lock:
            self._closed = True
            conn, reader = self._conn, self._reader
        if conn is not None:
            conn.shutdown()
        if reader is not None and reader is not threading.current_thread():
            reader.join()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        """A call or notification that claimed the connection ended."""
        with self._connect_lock:
            self._active -= 1
            self._last_used = time.monotonic()

    def _connection(self, claim: bool = False, timeout: float | None = None) -> _Conn:
        """The open connection, opened now if need be.

        *claim*: count a call in progress (it calls :meth:`_release` when it ends), so
        :meth:`disconnect_if_idle` leaves the connection open meanwhile. *timeout*: the
        call's, which bounds connecting and the handshake too (at least
        :data:`CONNECT_FLOOR_S`).
        """
        with self._connect_lock:
            if self._closed:
                msg = f"client of {self.address} is closed"
                raise ConnectionLost(msg)
            if self._conn is not None and not self._conn.closed:
                self._active += claim
                return self._conn
            if self._reader is not None:
                self._reader.join()  # the old reader has already failed its calls
            conn = self._open(timeout)
            self._conn = conn
            self._reader = threading.Thread(
                target=self._read_loop, args=(conn,), name=f"rpc-client-{self.address}", daemon=True
            )
            self._reader.start()
            self._active += claim
            return conn

    def _open(self, timeout: float | None = None) -> _Conn:
        connect_s, handshake_s = self._connect_timeout, self._handshake_timeout
        if timeout is not None:
            bound = max(timeout, CONNECT_FLOOR_S)
            connect_s, handshake_s = min(connect_s, bound), min(handshake_s, bound)
        try:
            sock = socket.create_connection(self.address, timeout=connect_s)
        except OSError as exc:
            msg = f"cannot connect to {self.address}: {exc!r}"
            raise ConnectionLost(msg) from exc
        try:
            _prepare_socket(sock)
            sock.settimeout(handshake_s)
            conn = _Conn(sock, self._max_frame)
            ctx = _context(self._ssl)
            if ctx is not None:
                host = self.address[0] if ctx.check_hostname else None
                conn = _TlsConn(sock, self._max_frame, ctx, server_side=False, hostname=host)
                conn.handshake()
            self._handshake(conn)
            sock.settimeout(IO_TIMEOUT)
            return conn
        except BaseException as exc:
            sock.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                msg = f"TLS peer verification of {self.address} failed: {exc}"
                raise AuthError(msg) from exc
            if isinstance(exc, ssl.SSLError):  # e.g. the server's alert: it refused our cert
                msg = f"TLS handshake with {self.address} failed: {exc}"
                raise AuthError(msg) from exc
            if isinstance(exc, OSError):
                msg = f"handshake with {self.address} failed: {exc!r}"
                raise ConnectionLost(msg) from exc
            raise

    def _handshake(self, conn: _Conn) -> None:
        where = f"RPC server at {self.address[0]}:{self.address[1]}"
        try:
            hello = conn.recv_raw(HANDSHAKE_MAX_FRAME, idle_ok=False)
        except ssl.SSLError as exc:  # TLS 1.3: the server checks our certificate after our
            # side of the handshake is done, so its refusal arrives as an alert here
            msg = f"{where} refused the TLS connection (our certificate?): {exc}"
            raise AuthError(msg) from exc
        except (RpcError, OSError) as exc:
            msg = f"{where} did not greet: {exc}"
            raise AuthError(msg) from exc
        if hello is None or len(hello) != len(_MAGIC) + _NONCE or hello[:4] != _MAGIC:
            msg = f"{where} is not a dstream RPC server (bad greeting)"
            raise AuthError(msg)
        server_nonce, client_nonce = bytes(hello[4:]), os.urandom(_NONCE)
        conn.send_raw(client_nonce + _mac(self._secret, b"client", server_nonce, client_nonce))
        rejected = f"{where} rejected our credentials: check that both use the same RPC secret"
        try:
            proof = conn.recv_raw(HANDSHAKE_MAX_FRAME, idle_ok=False)
        except (RpcError, OSError) as exc:
            raise AuthError(rejected) from exc
        if proof is None:
            raise AuthError(rejected)
        expected = _mac(self._secret, b"server", client_nonce, server_nonce)
        if not hmac.compare_digest(bytes(proof), expected):
            msg = f"{where} failed to prove it knows the shared RPC secret"
            raise AuthError(msg)

    def _read_loop(self, conn: _Conn) -> None:
        reason = "connection closed"
        try:
            while True:
                message = conn.recv()
                if message is None:
                    break
                self._deliver(message)
        except Exception as exc:  # socket, TLS, frame, msgpack or protocol failure
            if not conn.closed:
                reason = repr(exc)
                log.warning("rpc client of %s: connection dropped: %s", self.address, reason)
        finally:
            conn.shutdown()
            conn.sock.close()
            with self._lock:
                pending, self._pending = self._pending, {}
            err = f"connection to {self.address} lost: {reason}"
            for p in pending.values():
                p.error = ConnectionLost(err)
                p.done.set()

    def _deliver(self, message: Any) -> None:
        if isinstance(message, list) and len(message) == 4 and message[0] == _RESPONSE:
            _, msgid, error, result = message
            with self._lock:
                pending = self._pending.pop(msgid, None)
            if pending is None:
                return  # the call timed out; its late answer is dropped
            if error is not None:
                pending.error = RemoteError(str(error[0]), str(error[1]))
            pending.result = result
            pending.done.set()
        elif isinstance(message, list) and len(message) == 3 and message[0] == _NOTIFY:
            if self._on_notify is not None:
                try:
                    self._on_notify(message[1], message[2])
                except Exception:
                    log.warning("rpc client: on_notify(%r) raised", message[1], exc_info=True)
        else:
            msg = f"malformed message from {self.address}"
            raise RpcError(msg)


def connect(address: str | tuple[str, int], **kwargs: Any) -> RpcClient:
    """Create an :class:`RpcClient` and connect now (raise early if the server is down)."""
    client = RpcClient(address, **kwargs)
    try:
        client._connection()
    except BaseException:
        client.close()
        raise
    return client
