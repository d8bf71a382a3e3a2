"""Mutual TLS for the RPC transport: contexts from PEM files, reloaded when the files change.

Every RPC server and client of a fleet with ``DSTREAM_TLS_CERT``, ``DSTREAM_TLS_KEY`` and
``DSTREAM_TLS_CA`` set gets its :class:`ssl.SSLContext` from one :class:`MutualTls` per
process (see :func:`from_settings`), which:

* requires TLS 1.2 or later and a certificate from the peer on **both** sides (the server
  sets ``CERT_REQUIRED``), verified against the CA bundle;
* verifies the chain, **not the host name** (see :func:`server_context`);
* picks up rotated files without a restart: when a connection is opened and at least
  ``check_every`` seconds passed since the last look, the three files are ``stat``-ed
  (device, inode, size, mtime; through symlinks, so a Kubernetes Secret update, which swaps
  the ``..data`` symlink, is seen) and, if any changed, the contexts are rebuilt. A load
  that fails (a half-written pair: new certificate, old key) keeps the old contexts and is
  logged once per state of the files; the load is retried at the next check.

Only new connections use new files: an established connection keeps the identity it was
authenticated with (TLS has no re-authentication), which is how every TLS server behaves.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from ops.config import Settings

__all__ = [
    "DEFAULT_CHECK_EVERY_S",
    "MutualTls",
    "TlsFiles",
    "client_context",
    "from_settings",
    "server_context",
]

log = logging.getLogger(__name__)

#: How often (at most) the files are stat-ed, on a connection being opened. A Kubernetes
#: Secret update reaches the pod's volume within the kubelet sync period (about a minute);
#: 5 s more keeps "new connections use new certificates within a minute" of the kubelet's
#: swap in practice, and costs three ``stat`` calls per 5 s at most, on connect only.
DEFAULT_CHECK_EVERY_S = 5.0


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one process: its certificate (chain), its key, the fleet's CA bundle."""

    cert: str
    key: str
    ca: str


def _base(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=files.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The server side: present our certificate, require one from the client, verify it.

    Host names are not checked, on either side, on purpose: the fleet has one private CA
    that issues certificates to fleet processes only, so *a certificate chaining to that
    CA* is the identity ("a member of this fleet"). Peers reach each other by pod IP,
    StatefulSet DNS name or 127.0.0.1 (``dstream run``); the IPs change on every
    reschedule and one certificate is usually shared by all pods of a role, so a name
    check would either fail or be satisfied by wildcard SANs that add nothing. This is
    the usual stance of internal mTLS (Kafka's inter-broker TLS with an empty endpoint
    identification algorithm, service meshes checking SPIFFE IDs rather than DNS names).
    Consequences: use a CA dedicated to the fleet (not a cluster-wide one), and keep the
    shared RPC secret, which is checked inside TLS as without it.

    Certificates must be usable for both ends: no extended key usage, or both
    ``serverAuth`` and ``clientAuth`` (cert-manager: ``usages: [server auth, client
    auth]``), because every process both serves and calls.
    """
    return _base(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The client side: present our certificate, verify the server's chain (no host name).

    See :func:`server_context` for why the host name is not checked.
    """
    ctx = _base(ssl.Purpose.SERVER_AUTH, files)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # check_hostname=False leaves it; say it again
    return ctx


_Stamp = tuple[tuple[int, int, int, int], ...]


class MutualTls:
    """Server and client contexts of one process, rebuilt when the PEM files change.

    Thread-safe. :meth:`server` and :meth:`client` are what the RPC transport calls for
    each new connection (see ``ssl_context=`` of ``RpcServer``/``RpcClient``).

    Args:
        files: the certificate, key and CA bundle paths.
        check_every: at most this often (seconds) the files are stat-ed, when a
            context is asked for; 0 checks on every connection (tests).
        clock: a monotonic clock (tests).

    Raises:
        ConfigError: at construction, when the files cannot be loaded (missing, unreadable,
            key not matching the certificate, no CA in the bundle): a process must not
            start with TLS configured but unusable.

    """

    def __init__(
        self,
        files: TlsFiles,
        *,
        check_every: float = DEFAULT_CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self._check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        stamp = self._stamp()
        try:
            self._server, self._client = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            msg = (
                f"cannot load the RPC TLS files (cert={files.cert}, key={files.key}, "
                f"ca={files.ca}): {exc}; check DSTREAM_TLS_CERT, DSTREAM_TLS_KEY and "
                "DSTREAM_TLS_CA (PEM files; the key must match the certificate)"
            )
            raise ConfigError(msg) from exc
        self._loaded: _Stamp | None = stamp
        self._failed: _Stamp | None = None
        self._checked = clock()
        #: how many times the contexts were rebuilt after the first load
        self.reloads = 0

    def server(self) -> ssl.SSLContext:
        """The server context to use for a connection being accepted now."""
        self._maybe_reload()
        return self._server

    def client(self) -> ssl.SSLContext:
        """The client context to use for a connection being opened now."""
        self._maybe_reload()
        return self._client

    def _load(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        return server_context(self.files), client_context(self.files)

    def _stamp(self) -> _Stamp | None:
        """Identity of the files' current contents, or None if one cannot be stat-ed."""
        out = []
        for path in (self.files.cert, self.files.key, self.files.ca):
            try:
                st = os.stat(path)  # follows symlinks: sees a swapped ..data target
            except OSError:
                return None
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < self._check_every:
            return
        with self._lock:
            if now - self._checked < self._check_every:
                return  # another thread just checked
            self._checked = now
            stamp = self._stamp()
            if stamp is None or stamp == self._loaded:
                return  # a missing file is a swap in progress: keep the contexts
            try:
                contexts = self._load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                if stamp != self._failed:
                    self._failed = stamp
                    log.warning(
                        "RPC TLS files changed but do not load (%s); keeping the previous "
                        "certificate until they do (cert=%s, key=%s, ca=%s)",
                        exc,
                        self.files.cert,
                        self.files.key,
                        self.files.ca,
                    )
                return
            # a changed file may still be being written; a pair that loads is consistent
            # (load_cert_chain checks that the key matches the certificate)
            self._server, self._client = contexts
            self._loaded, self._failed = stamp, None
            self.reloads += 1
            log.info("RPC TLS files changed: new connections use the new certificate")


_shared: dict[tuple[TlsFiles, float], MutualTls] = {}
_shared_lock = threading.Lock()


def from_settings(
    settings: Settings, *, check_every: float = DEFAULT_CHECK_EVERY_S
) -> MutualTls | None:
    """The process's :class:`MutualTls` for the settings, or None when TLS is off.

    TLS is on when ``tls_cert``, ``tls_key`` and ``tls_ca`` are all set, off when none is.
    One instance per set of files is shared by every server and client of the process,
    so the files are stat-ed and loaded once, not once per peer.

    Raises:
        ConfigError: only some of the three are set, or the files do not load.

    """
    values = {
        "DSTREAM_TLS_CERT (--tls-cert)": settings.tls_cert,
        "DSTREAM_TLS_KEY (--tls-key)": settings.tls_key,
        "DSTREAM_TLS_CA (--tls-ca)": settings.tls_ca,
    }
    if not any(values.values()):
        return None
    missing = [name for name, v in values.items() if not v]
    if missing:
        given = [name for name, v in values.items() if v]
        msg = (
            f"RPC TLS needs a certificate, its key and the CA bundle: {', '.join(given)} "
            f"set but {', '.join(missing)} not; set all three for mutual TLS, or none"
        )
        raise ConfigError(msg)
    files = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
    with _shared_lock:
        tls = _shared.get((files, check_every))
        if tls is None:
            tls = _shared[(files, check_every)] = MutualTls(files, check_every=check_every)
            log.info(
                "RPC mutual TLS on (cert=%s, ca=%s; files checked for rotation every %g s)",
                files.cert,
                files.ca,
                check_every,
            )
        return tls
