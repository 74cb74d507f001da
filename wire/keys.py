"""CurveZMQ on every link: key folders, socket options and the ZAP allow-list, for both sides.

Agents, the base station and `shard_tool push` all import this module; nobody else sets CURVE
options or starts an authenticator. Keys are ZeroMQ's certificate files (`zmq.auth`).

A key folder (`edge_agent keygen DIR`, `basestation keygen DIR`) is one identity:
    DIR/NAME.key_secret   this box's keypair (mode 0600; never leaves the box)
    DIR/NAME.key          this box's public certificate: the file to give to peers
    DIR/trusted/*.key     peers allowed to compute: on an agent, the base stations (and probes);
                          on a base station, the agents allowed to dial in
    DIR/pushers/*.key     (agents only) keys allowed to push shards; a key may be in both
The bound side (an agent's --bind, a base station's --listen) runs a ZAP authenticator that
admits only those keys: any other peer fails the CURVE handshake and gets no answer at all. The
connecting side names the peer's public key (`curve_serverkey`), so it talks to that box only.
Folders are read at start: restart to admit a new key.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"
TRUSTED_DIR = "trusted"
PUSHERS_DIR = "pushers"
ZAP_DOMAIN = "wdmoe"  # the authenticator answers for this domain only; our servers set it
Z85_KEY_CHARS = 40  # a 32-byte CURVE key in Z85 text

# What a peer's key lets it do on an agent (EXPERT needs compute, PUSH_* needs push; any
# admitted key may PING and ask INFO).
ROLE_COMPUTE = "compute"
ROLE_PUSH = "push"
ALL_ROLES = frozenset({ROLE_COMPUTE, ROLE_PUSH})  # an agent without keys refuses no one

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

log = logging.getLogger("edge_agent")


class KeysError(Exception):
    """A key folder, certificate or key that cannot be used; the message is one line for the
    user."""


@dataclass(frozen=True)
class Keypair:
    public: bytes  # Z85 text, 40 bytes
    secret: bytes = field(repr=False)  # Z85 text
    path: str = ""  # the secret certificate it was read from


@dataclass(frozen=True)
class KeyFolder:
    """`--keys DIR`: this box's keypair and the public keys of the peers it admits."""

    folder: str
    keypair: Keypair
    trusted: frozenset[bytes]  # Z85 public keys from DIR/trusted/
    pushers: frozenset[bytes] = frozenset()  # Z85 public keys from DIR/pushers/

    @property
    def admitted(self) -> frozenset[bytes]:
        """Every key the bound socket lets through the handshake."""
        return self.trusted | self.pushers

    def roles_by_key(self) -> dict[str, frozenset[str]]:
        """Public key as ZAP's User-Id (Z85 text) -> what it may do."""
        roles: dict[str, set[str]] = {}
        for key in self.trusted:
            roles.setdefault(key.decode(), set()).add(ROLE_COMPUTE)
        for key in self.pushers:
            roles.setdefault(key.decode(), set()).add(ROLE_PUSH)
        return {key: frozenset(r) for key, r in roles.items()}


# ---------------------------------------------------------------------------------------------
# Files


def keygen(folder: str, name: str, peer_folders: tuple[str, ...] = (TRUSTED_DIR,)
           ) -> tuple[str, str]:
    """Write a new keypair as DIR/NAME.key + DIR/NAME.key_secret and make the peer folders.

    All or nothing, and never over an existing key. Returns (public path, secret path).
    Raises KeysError.
    """
    if not NAME_RE.fullmatch(name):
        raise KeysError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    public, secret = (os.path.join(folder, name + s) for s in (PUBLIC_SUFFIX, SECRET_SUFFIX))
    for path in (public, secret):
        if os.path.lexists(path):
            raise KeysError(f"{path} exists: keygen never replaces a key (remove it first, or "
                            "choose another --name)")
    held = glob.glob(os.path.join(glob.escape(folder), "*" + SECRET_SUFFIX))
    if held:
        raise KeysError(f"{folder} already holds a keypair ({os.path.basename(held[0])}): one "
                        "folder is one identity")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # Written in a private temporary folder, then hard-linked into place: a link never
        # replaces an existing file, and an interruption leaves no half-written key behind.
        staging = tempfile.mkdtemp(prefix=".keygen-", dir=folder)
        try:
            staged_public, staged_secret = zmq.auth.create_certificates(staging, name)
            os.chmod(staged_secret, 0o600)
            os.link(staged_secret, secret)
            try:
                os.link(staged_public, public)
            except BaseException:
                os.unlink(secret)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for sub in peer_folders:
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
    except FileExistsError as e:
        raise KeysError(f"{e.filename2 or e.filename} exists: keygen never replaces a key") \
            from None
    except OSError as e:
        raise KeysError(f"{e.filename or folder}: {e.strerror}") from None
    return public, secret


def load_keypair(folder: str, program: str = "edge_agent") -> Keypair:
    """The one DIR/*.key_secret of a key folder. Raises KeysError."""
    hint = f"make one with `{program} keygen {folder}`"
    if not os.path.isdir(folder):
        raise KeysError(f"--keys {folder}: no such folder ({hint})")
    secrets = sorted(glob.glob(os.path.join(glob.escape(folder), "*" + SECRET_SUFFIX)))
    if not secrets:
        raise KeysError(f"--keys {folder}: no *{SECRET_SUFFIX} keypair in it ({hint})")
    if len(secrets) > 1:
        raise KeysError(f"--keys {folder}: {len(secrets)} keypairs in it "
                        f"({', '.join(os.path.basename(s) for s in secrets)}); keep one")
    public, secret = _read_certificate(secrets[0])
    if secret is None:
        raise KeysError(f"{secrets[0]}: no secret-key in this certificate")
    return Keypair(public=public, secret=secret, path=secrets[0])


def load_key_folder(folder: str, program: str = "edge_agent") -> KeyFolder:
    """`--keys DIR` read whole: keypair, trusted/ and pushers/ (missing folders are empty).
    Raises KeysError."""
    return KeyFolder(folder=folder, keypair=load_keypair(folder, program),
                     trusted=_public_keys_in(os.path.join(folder, TRUSTED_DIR)),
                     pushers=_public_keys_in(os.path.join(folder, PUSHERS_DIR)))


def read_certificate(path: str) -> bytes:
    """The public key of a certificate file (NAME.key, or a NAME.key_secret). Raises KeysError."""
    return _read_certificate(path)[0]


def parse_public_key(text: str) -> bytes:
    """A public key written out (Z85, 40 characters, as in a .key file). Raises KeysError."""
    key = text.strip().encode() if isinstance(text, str) else b""
    try:
        if len(key) == Z85_KEY_CHARS and len(z85.decode(key)) == 32:
            return key
    except (ValueError, KeyError, IndexError):  # z85.decode raises these on stray characters
        pass
    raise KeysError(f"{str(text)[:50]!r} is not a CURVE public key (40 Z85 characters, the "
                    "public-key of a .key file)")


def public_key_arg(value: str) -> bytes:
    """A command-line key: a certificate file when one exists at that path, else the key text.
    Raises KeysError."""
    return read_certificate(value) if os.path.isfile(value) else parse_public_key(value)


def trust(folder: str, certificate: str, peer_folder: str = TRUSTED_DIR) -> str:
    """Admit a peer: write the public part of `certificate` into DIR/<peer_folder>/ under the
    certificate's name (for tools such as the testbed that wire keys up). Returns the path.
    Raises KeysError."""
    public = read_certificate(certificate)
    name = os.path.basename(certificate).removesuffix(SECRET_SUFFIX).removesuffix(PUBLIC_SUFFIX)
    target_dir = os.path.join(folder, peer_folder)
    target = os.path.join(target_dir, name + PUBLIC_SUFFIX)
    try:
        os.makedirs(target_dir, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix=".trust-", dir=target_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f'#   ZeroMQ CURVE Public Certificate (a peer admitted here)\n'
                        f'metadata\ncurve\n    public-key = "{public.decode()}"\n')
            os.chmod(staged, 0o644)
            os.replace(staged, target)  # whole or not at all
        except BaseException:
            os.unlink(staged)
            raise
    except OSError as e:
        raise KeysError(f"{e.filename or target_dir}: {e.strerror}") from None
    return target


def _read_certificate(path: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError:
        raise KeysError(f"{path}: no such certificate file") from None
    except ValueError:
        raise KeysError(f"{path}: not a ZeroMQ certificate (no public-key line)") from None
    try:
        parse_public_key(public.decode(errors="replace"))
        if secret is not None:
            parse_public_key(secret.decode(errors="replace"))
    except KeysError:
        raise KeysError(f"{path}: a key in it is not 40 Z85 characters") from None
    return public, secret


def _public_keys_in(folder: str) -> frozenset[bytes]:
    if not os.path.isdir(folder):
        return frozenset()
    return frozenset(read_certificate(path) for path in
                     sorted(glob.glob(os.path.join(glob.escape(folder), "*" + PUBLIC_SUFFIX))))


# ---------------------------------------------------------------------------------------------
# Protected by default


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether only this machine can reach `endpoint` (loopback TCP, ipc://, inproc://)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard, an interface or a name: it may be reachable from outside


def refuse_unprotected_bind(endpoint: str, keys: KeyFolder | None, insecure: bool,
                            program: str, flag: str) -> None:
    """A bind beyond loopback needs keys, or --insecure on purpose. Raises KeysError."""
    if keys is None and not insecure and not is_loopback_endpoint(endpoint):
        raise KeysError(f"{flag} {endpoint} is reachable beyond this machine: make keys with "
                        f"`{program} keygen DIR` and pass --keys DIR, or pass --insecure to "
                        "serve unencrypted and to anyone")


# ---------------------------------------------------------------------------------------------
# Sockets. ZeroMQ copies a socket's options into each bind or connect when it is made, so these
# are set right before every bind()/connect(): one ROUTER can dial agents with different keys,
# plain ones too, and listen as a CURVE server (measured on libzmq 4.3.5).


def set_plain(sock: zmq.Socket) -> None:
    """The next bind/connect of `sock` uses no security (ZeroMQ's NULL mechanism)."""
    # also resets the mechanism to NULL; a ZAP domain left from a keyed bind stays (libzmq
    # refuses an empty one) and is harmless: our authenticator admits NULL links
    sock.setsockopt(zmq.CURVE_SERVER, 0)


def set_curve_client(sock: zmq.Socket, keypair: Keypair, server_key: bytes) -> None:
    """The next connect of `sock` is a CURVE client of the peer whose public key is
    `server_key`: encrypted, and only that peer can complete the handshake."""
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)


def set_curve_server(sock: zmq.Socket, keypair: Keypair) -> None:
    """The next bind of `sock` is a CURVE server whose clients ZAP checks (start_authenticator
    first: libzmq admits any client key when no ZAP handler is running)."""
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


class _AllowList:
    """pyzmq's credentials-provider interface: ZAP asks it about each CURVE client's key."""

    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        if key not in self.keys:
            log.debug("ZAP: refused key %s", key.decode(errors="replace"))
        return key in self.keys


def start_authenticator(ctx: zmq.Context, admitted: frozenset[bytes]) -> ThreadAuthenticator:
    """ZAP for every CURVE server socket of `ctx`: clients whose public key is in `admitted`
    get through, others fail the handshake. One per context; `stop()` it before ctx.term()."""
    authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("edge_agent.zap"))
    authenticator.configure_curve_callback(ZAP_DOMAIN, _AllowList(frozenset(admitted)))
    authenticator.start()
    return authenticator


def peer_public_key(frame: zmq.Frame) -> str | None:
    """The sender's public key (Z85 text) of a message received on a CURVE server socket: ZAP's
    User-Id, which our authenticator sets to the key. None on other sockets."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # no such property: a NULL-mechanism connection
        return None
