"""A throw-away PKI for TLS tests, made with the ``openssl`` command line.

Usage::

    pki = make_pki(tmp_path / "pki")
    pki.ca, pki.server_cert, pki.server_key          # broker side (CN and SAN: localhost, 127.0.0.1)
    pki.client_cert, pki.client_key                   # a client certificate signed by the CA
    pki.rogue_ca, pki.rogue_client_cert, ...          # a second, unrelated CA and a client it signed
    pki.expired_server_cert, pki.expired_client_cert  # signed by the CA, valid only in January 2020

Keys are EC P-256 (fast to make); every file is mode 0600.  ``openssl ca`` is used for the
expired certificates because ``openssl x509 -days`` cannot back-date a certificate.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

_EXPIRED_START = "20200101000000Z"
_EXPIRED_END = "20200102000000Z"


class PkiError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    expired_server_cert: Path
    expired_server_key: Path
    expired_client_cert: Path
    expired_client_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PkiError("openssl is not installed (apt-get install openssl)")
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise PkiError(f"openssl {' '.join(args[:2])} failed:\n{r.stderr}")


def _key(d: Path, name: str) -> Path:
    _openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
    return d / f"{name}.key"


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key = _key(d, name)
    _openssl(d, "req", "-x509", "-new", "-key", key.name, "-out", f"{name}.crt", "-days", "3",
             "-subj", f"/CN=edge-lstm test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return d / f"{name}.crt", key


def _ext(d: Path, name: str, server: bool) -> Path:
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    p = d / f"{name}.ext"
    p.write_text("\n".join(lines) + "\n")
    return p


def _leaf(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key = _key(d, name)
    cn = "localhost" if server else name
    _openssl(d, "req", "-new", "-key", key.name, "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", ca[0].name, "-CAkey", ca[1].name,
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3",
             "-extfile", _ext(d, name, server).name)  # fmt: skip
    return d / f"{name}.crt", key


def _expired_leaf(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    """A certificate whose validity ended long ago, signed by ``ca`` (``openssl ca`` can back-date)."""
    key = _key(d, name)
    cn = "localhost" if server else name
    _openssl(d, "req", "-new", "-key", key.name, "-out", f"{name}.csr", "-subj", f"/CN={cn}")
    db = d / f"{name}.db"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    conf = d / f"{name}.cnf"
    conf.write_text(
        "[ca]\ndefault_ca = test\n"
        "[test]\n"
        f"database = {db}/index.txt\nserial = {db}/serial\nnew_certs_dir = {db}\n"
        "default_md = sha256\npolicy = any\ncopy_extensions = none\n"
        "[any]\ncommonName = supplied\n"
    )
    _openssl(d, "ca", "-batch", "-config", conf.name, "-cert", ca[0].name, "-keyfile", ca[1].name,
             "-in", f"{name}.csr", "-out", f"{name}.crt", "-startdate", _EXPIRED_START, "-enddate", _EXPIRED_END,
             "-extfile", _ext(d, name, server).name, "-notext")  # fmt: skip
    return d / f"{name}.crt", key


def make_pki(directory: Path) -> Pki:
    """Create the CA, the rogue CA and every certificate in ``directory`` (made if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "ca")
    rogue = _ca(d, "rogue-ca")
    server = _leaf(d, "server", ca, server=True)
    client = _leaf(d, "client", ca, server=False)
    rogue_client = _leaf(d, "rogue-client", rogue, server=False)
    expired_server = _expired_leaf(d, "expired-server", ca, server=True)
    expired_client = _expired_leaf(d, "expired-client", ca, server=False)
    for p in d.rglob("*"):
        if p.is_file():
            p.chmod(0o600)
    return Pki(
        directory=d,
        ca=ca[0],
        ca_key=ca[1],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        rogue_ca=rogue[0],
        rogue_client_cert=rogue_client[0],
        rogue_client_key=rogue_client[1],
        expired_server_cert=expired_server[0],
        expired_server_key=expired_server[1],
        expired_client_cert=expired_client[0],
        expired_client_key=expired_client[1],
    )


def tls_listener(pki: Pki, *, expired_server: bool = False, require_certificate: bool = True) -> str:
    """A Mosquitto listener block (``{port}`` left in) for this PKI."""
    if expired_server:
        cert, key = pki.expired_server_cert, pki.expired_server_key
    else:
        cert, key = pki.server_cert, pki.server_key
    return (
        "listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {pki.ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
        "use_identity_as_username false"
    )
