"""The bytes behind an image or video URL: a base64 data: URL, or when allowed an http(s) URL (fetched within
--image-timeout, from public addresses unless --allow-private-image-hosts) or a local file; each within
--max-image-bytes."""

import base64
import binascii
import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from .requests import ApiError
from .settings import ServerSettings

MAX_REDIRECTS = 5  # redirects followed to fetch a remote image


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, limited to MAX_REDIRECTS and to http(s): urllib alone follows 10, and to ftp://
    as well (a way past the data:-only default onto another protocol)."""

    def __init__(self, param: str):
        self.param, self.count = param, 0

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        self.count += 1
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            fail = f"redirected to {target[:200]}; only http(s) redirects are followed"
        elif self.count > MAX_REDIRECTS:
            fail = f"more than {MAX_REDIRECTS} redirects"
        else:
            return super().http_error_302(req, fp, code, msg, headers)
        fp.close()
        raise ApiError(400, f"{self.param}: could not fetch {req.full_url[:200]}: {fail}", self.param,
                       "image_fetch_failed")

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class HostRefused(ValueError):
    """A remote image's host is at an address that is not public."""


# RFC 6052's well-known NAT64 prefix: the last 32 bits are an IPv4 address, which a NAT64 gateway
# connects to (an IPv6-only host with DNS64 reaches every IPv4-only site this way).
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(ip: str) -> str | None:
    """Why an image may not be fetched from `ip` unless --allow-private-image-hosts ("loopback", ...), or None
    for a public address. An IPv4 address inside IPv6 (::ffff:a.b.c.d, 6to4, NAT64's 64:ff9b::a.b.c.d) is
    judged as that IPv4 address."""
    address = ipaddress.ip_address(ip)
    if address.version == 6:
        if address in NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            address = address.ipv4_mapped or address.sixtofour or address
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private", "site_local"):
        if getattr(address, "is_" + kind, False):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"  # 100.64.0.0/10 (carrier-grade NAT), say


def public_addresses(host: str, port: int, resolve=socket.getaddrinfo) -> list[tuple[str, int]]:
    """The (ip, port) addresses of `host`, looked up once with `resolve` (getaddrinfo's signature); HostRefused
    when any of them is not public."""
    addresses = [sockaddr[:2] for *_, sockaddr in resolve(host, port, type=socket.SOCK_STREAM)]
    for ip, _ in addresses:
        if reason := refusal(ip):
            raise HostRefused(f"host {host!r} is at {ip}, {'an' if reason == 'unspecified' else 'a'} {reason} address")
    return addresses


class _Deadline:
    """Shuts the sockets of one fetch down when its time is up. urllib's timeout bounds each read alone, so a host
    that sends a byte now and then, in the status line and headers as in the body, would hold the request and a
    thread for as long as it likes; a read blocked there ends at the shutdown. It holds a duplicate of each
    socket's descriptor (shutdown acts on the connection, whichever descriptor names it), closed by `stop`."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._fds: list[int] | None = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._fds is None:  # a redirect's connection made after the time was up
                sock.shutdown(socket.SHUT_RDWR)
            else:
                self._fds.append(os.dup(sock.fileno()))

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def left(self) -> float:
        """The seconds left, for a connection's attempt; TimeoutError once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the time is up")
        return left

    def _expire(self) -> None:
        with self._lock:
            fds, self._fds = self._fds or [], None
            for fd in fds:
                with socket.socket(fileno=fd) as sock, contextlib.suppress(OSError):  # closes the duplicate
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            fds, self._fds = self._fds or [], None
            for fd in fds:
                os.close(fd)


class _FetchConnection(http.client.HTTPConnection):
    """An HTTP connection whose sockets `deadline` watches; unless `private` (--allow-private-image-hosts) to
    public addresses only. It then connects to an address that `public_addresses` checked, not to the host name
    (a second lookup that DNS could answer differently: rebinding); the Host header, and in the HTTPS subclass the
    TLS server name, stay the URL's host."""

    resolve = staticmethod(socket.getaddrinfo)
    private = False
    deadline: _Deadline

    def connect(self):
        # connecting is within the deadline too: each attempt gets the time left (a host whose DNS answer lists
        # several addresses that drop packets, or a redirect to one, held the fetch --image-timeout per address)
        if self.private:
            self.timeout = self.deadline.left()
            super().connect()  # to the host's addresses, or through a proxy from the environment (its tunnel too)
        else:
            *others, last = public_addresses(self.host, self.port, self.resolve)
            for address in others:  # each address in turn, as socket.create_connection tries them
                with contextlib.suppress(OSError):
                    self.sock = socket.create_connection(address, self.deadline.left(), self.source_address)
                    break
            else:
                self.sock = socket.create_connection(last, self.deadline.left(), self.source_address)
        self.deadline.watch(self.sock)


class _FetchHTTPSConnection(http.client.HTTPSConnection, _FetchConnection):
    """HTTPS over `_FetchConnection`'s connect (HTTPSConnection.connect wraps what it connected)."""


class _FetchHosts(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handler over the connections above, which look hosts up with `resolve`."""

    def __init__(self, resolve, deadline: _Deadline, private: bool):
        super().__init__()
        self.resolve, self.deadline, self.private = resolve, deadline, private

    def _connection(self, cls, host, **kwargs):
        connection = cls(host, **kwargs)
        connection.resolve, connection.deadline, connection.private = self.resolve, self.deadline, self.private
        return connection

    def http_open(self, req):
        return self.do_open(functools.partial(self._connection, _FetchConnection), req)

    def https_open(self, req):
        return self.do_open(functools.partial(self._connection, _FetchHTTPSConnection), req)


def _quoted(url: str) -> str:
    """`url` with the characters a request line cannot carry (non-ASCII ones as their UTF-8 bytes, spaces, controls)
    percent-encoded in its path, query and fragment, as requests and browsers send them; escapes and the characters
    URLs reserve are kept, and the host is left to the resolver (an international name goes out as IDNA)."""
    if any(ord(c) < 32 or c == "\x7f" for c in url):  # urlsplit would drop tabs and newlines: urllib refuses them
        return url
    parts = urllib.parse.urlsplit(url)
    safe = "!#$%&'()*+,/:;=?@[]~"
    return urllib.parse.urlunsplit(parts._replace(**{name: urllib.parse.quote(getattr(parts, name), safe)
                                                     for name in ("path", "query", "fragment")}))


def _fetch_remote(url: str, param: str, settings: ServerSettings, resolve=socket.getaddrinfo) -> bytes:
    """The image at `url` within `image_timeout` seconds in all, headers and redirects included (`_Deadline`).
    Unless --allow-private-image-hosts, every connection (each redirect hop's too) goes to a public address
    of its host, looked up with `resolve`, and proxies from the environment are not used (a proxy would
    connect where this server cannot check). The host's name lookup itself is the system resolver's, outside
    the bound."""
    deadline = _Deadline(settings.image_timeout)
    data = bytearray()
    private = settings.allow_private_image_hosts
    hosts = _FetchHosts(resolve, deadline, private)
    opener = urllib.request.build_opener(*([] if private else [urllib.request.ProxyHandler({})]), hosts,
                                         _Redirects(param))
    late = TimeoutError(f"not received within {settings.image_timeout} s")
    try:
        with opener.open(_quoted(url), timeout=settings.image_timeout) as response:
            encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            while len(data) <= settings.max_image_bytes and (piece := response.read1(2**16)):
                data += piece
        if deadline.passed():  # a body the shutdown cut ends early
            raise late
        data = _decoded(bytes(data), encoding, url, param, settings)
    except HostRefused as e:
        raise ApiError(400, f"{param}: refused to fetch {url[:200]}: {e}; start the server with "
                            "--allow-private-image-hosts to fetch from this machine or its network", param,
                       "remote_image_refused") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL is an HTTPException
        reason = late if deadline.passed() else e  # a read that the shutdown ended fails in its own words
        raise ApiError(400, f"{param}: could not fetch {url[:200]}: {reason}", param, "image_fetch_failed") from None
    finally:
        deadline.stop()
    return bytes(data)


def _decoded(data: bytes, encoding: str, url: str, param: str, settings: ServerSettings) -> bytes:
    """A fetched body decoded as its Content-Encoding says, as requests and aiohttp (vLLM's fetchers) decode it: a
    host may send gzip whatever the request asked (an object stored compressed, say). At most --max-image-bytes + 1
    bytes come out, so a small bomb is a 413, not a full memory."""
    if encoding in ("identity", "") or len(data) > settings.max_image_bytes:  # past the limit: the 413 already
        return data
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ApiError(400, f"{param}: could not fetch {url[:200]}: the host sent it with Content-Encoding "
                            f"{encoding[:40]!r}, which this server cannot decode", param, "image_fetch_failed")
    problem = None
    # gzip's header; deflate as zlib data (RFC 9110), else raw, as some hosts send it
    for wbits in (zlib.MAX_WBITS | 16,) if encoding != "deflate" else (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(data, settings.max_image_bytes + 1)
        except zlib.error as e:
            problem = problem or str(e)
            continue
        if len(out) > settings.max_image_bytes or decoder.eof:
            return out + _later_members(decoder, wbits, settings.max_image_bytes + 1 - len(out))
        problem = problem or "the compressed stream is cut short"
    raise ApiError(400, f"{param}: could not fetch {url[:200]}: its {encoding} body does not decode ({problem})",
                   param, "image_fetch_failed")


def _later_members(decoder, wbits: int, room: int) -> bytes:
    """The gzip members after the one `decoder` finished (`cat a.gz b.gz`), decoded as urllib3 (requests) decodes
    them, up to `room` bytes; bytes after the last member that are no gzip data are ignored, as it ignores them."""
    out, rest = b"", decoder.unused_data
    # gzip only: raw deflate's -15 has the 16 bit set too (two's complement), and urllib3 reads one deflate stream
    while rest and wbits == zlib.MAX_WBITS | 16 and room > len(out) and decoder.eof:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(rest, room - len(out))
        except zlib.error:
            break
        rest = decoder.unused_data
    return out


def _read_local(url: str, param: str, settings: ServerSettings) -> bytes:
    """The file named by a path or a file URL (percent-decoded; its host empty or localhost)."""
    path = Path(url)
    if url[:5].lower() == "file:":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc.lower() not in ("", "localhost"):  # a host name is read whatever its case (RFC 3986)
            raise ApiError(400, f"{param}: a file URL must name this machine (file:///path or file://localhost/path), "
                                f"got host {parts.netloc[:100]!r}", param, "invalid_image")
        path = Path(urllib.parse.unquote(parts.path))
    shown = str(path)[:200]
    try:
        if not path.is_file():
            raise ApiError(400, f"{param}: {shown} is not a file", param, "invalid_image")
        size = path.stat().st_size
        if size > settings.max_image_bytes:
            raise _too_large(param, f"{shown} is {size} bytes", settings)
        return path.read_bytes()
    except OSError as e:  # a name too long, no permission, ...
        raise ApiError(400, f"{param}: could not read {shown}: {e.strerror or e}", param, "invalid_image") from None


def image_bytes(url: str, param: str, settings: ServerSettings) -> bytes:
    """The bytes behind an image URL: a base64 `data:` URL, or (only when allowed) http(s) or a local file. A
    scheme is read whatever its case (RFC 3986; vLLM reads it so), and so is a data URL's ";base64". A video's
    bytes (`param` a video_url part) are read alike, their errors saying "video"."""
    kind = _kind(param)
    start = url[:8].lower()
    if start.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ApiError(400, f"{param}: a data URL must be base64 encoded (data:image/png;base64,...)", param,
                           "invalid_image")
        data = "".join(data.split())
        if len(data) // 4 * 3 > settings.max_image_bytes + 2:
            raise _too_large(param, f"the {kind} is larger", settings)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{param}: the data URL is not valid base64 ({e})", param, "invalid_image") from None
    elif start.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{param}: remote {kind} URLs are refused; send the {kind} as a data: URL "
                                "(or start the server with --allow-remote-images)", param, "remote_image_refused")
        raw = _fetch_remote(url, param, settings)
    elif (scheme := urllib.parse.urlsplit(url).scheme) not in ("", "file"):
        raise ApiError(400, f"{param}: unsupported URL scheme {scheme[:20]!r}; {kind}s come as data: URLs, http(s) "
                            "URLs or (when allowed) file URLs and paths", param, "invalid_image")
    else:
        if not settings.allow_local_images:
            raise ApiError(400, f"{param}: local {kind} files are refused; send the {kind} as a data: URL "
                                "(or start the server with --allow-local-images)", param, "local_image_refused")
        raw = _read_local(url, param, settings)
    if len(raw) > settings.max_image_bytes:
        raise _too_large(param, f"the {kind} is larger", settings)  # a fetch stops reading past the limit
    return raw


def _kind(param: str) -> str:
    """What the URL at `param` is: "video" for a video_url part, else "image" (their bytes are read alike)."""
    return "video" if param.endswith("video_url") else "image"


def _too_large(param: str, what: str, settings: ServerSettings) -> ApiError:
    """The 413 for an image (or a video) of more bytes than the server takes, naming the flag that sets the limit."""
    return ApiError(413, f"{param}: {what}; {_kind(param)}s may be at most {settings.max_image_bytes} bytes (the "
                         "server's --max-image-bytes)", param, "image_too_large")
