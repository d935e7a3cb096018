"""What the secure-connection tests need: a private PKI, nkeys and JWTs, and nats-server config files.

Everything is made fresh in a temporary folder per test; nothing here talks to a network.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# ---- PKI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail
    other_client_cert: Path  # a client certificate from other_ca: the server must refuse it
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    """A private CA, a server certificate for 127.0.0.1/localhost, a client certificate; and a stranger CA."""
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca, ca_key = _make_ca("uploads-consumer test CA")
    server, server_key = _issue(ca, ca_key, "nats-server", server=True)
    client, client_key = _issue(ca, ca_key, "uploads-consumer", server=False)
    other, other_key = _make_ca("some other CA")
    other_client, other_client_key = _issue(other, other_key, "stranger", server=False)
    pki = Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server-key.pem",
        client_cert=folder / "client.pem",
        client_key=folder / "client-key.pem",
        other_ca=folder / "other-ca.pem",
        other_client_cert=folder / "other-client.pem",
        other_client_key=folder / "other-client-key.pem",
    )
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.server_cert.write_bytes(server.public_bytes(pem))
    _write_key(server_key, pki.server_key)
    pki.client_cert.write_bytes(client.public_bytes(pem))
    _write_key(client_key, pki.client_key)
    pki.other_ca.write_bytes(other.public_bytes(pem))
    pki.other_client_cert.write_bytes(other_client.public_bytes(pem))
    _write_key(other_client_key, pki.other_client_key)
    return pki


# ---- nkeys and JWTs ----------------------------------------------------------------------------


def new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey of one role, e.g. nkeys.PREFIX_BYTE_USER."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(kp: nkeys.KeyPair) -> str:
    return kp.public_key.decode()


def seed(kp: nkeys.KeyPair) -> str:
    return bytes(kp.seed).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(subject: str, name: str, nats_claims: dict, issuer: nkeys.KeyPair) -> str:
    """A NATS v2 JWT (alg ed25519-nkey), signed by `issuer`, as the nsc tool would write it."""
    claims = {
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    )
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64url(signature)}"


UNLIMITED_ACCOUNT = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    # JetStream is enabled for an account by giving it storage.
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


@dataclass(frozen=True)
class Decentralized:
    """An operator, one JetStream-enabled account and one user of it, as a resolver: MEMORY setup."""

    operator_jwt: str
    account_public: str
    account_jwt: str
    system_public: str  # JetStream needs a system account in operator mode
    system_jwt: str
    creds_text: str  # the user's .creds file: user JWT + user seed
    user_seed: str


def make_decentralized() -> Decentralized:
    operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    operator_jwt = encode_jwt(
        public(operator), "test-operator", {"type": "operator", "system_account": public(system)}, operator
    )
    system_jwt = encode_jwt(
        public(system),
        "SYS",
        {"type": "account", "limits": {"conn": -1, "subs": -1, "data": -1, "payload": -1}},
        operator,
    )
    account_jwt = encode_jwt(
        public(account),
        "UPLOADS",
        {"type": "account", "limits": UNLIMITED_ACCOUNT, "default_permissions": {"pub": {}, "sub": {}}},
        operator,
    )
    user_jwt = encode_jwt(
        public(user),
        "uploads-consumer",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        account,
    )
    creds = (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed(user)}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    return Decentralized(operator_jwt, public(account), account_jwt, public(system), system_jwt, creds, seed(user))


# ---- nats-server configuration ------------------------------------------------------------------


def write_config(folder: Path, *, body: str = "", tls: Pki | None = None, verify_clients: bool = False) -> Path:
    """A nats-server config file with JetStream, optional TLS (and client verification), plus `body`.

    The store directory is not named here: embedded.NatsServer passes `-sd`, and nats-server
    refuses a store_dir given twice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["jetstream { max_file_store: 1GB, max_memory_store: 256MB }"]
    if tls is not None:
        lines.append(
            "tls {\n"
            f'  cert_file: "{tls.server_cert}"\n  key_file: "{tls.server_key}"\n  ca_file: "{tls.ca}"\n'
            f"  verify: {'true' if verify_clients else 'false'}\n  timeout: 5\n}}"
        )
    lines.append(body)
    path = folder / "nats.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def users_block(*users: tuple[str, str]) -> str:
    entries = ", ".join(f'{{ user: "{u}", password: "{p}" }}' for u, p in users)
    return f"authorization {{ users: [ {entries} ] }}"


def operator_block(d: Decentralized) -> str:
    return (
        f'operator: "{d.operator_jwt}"\n'
        f'system_account: "{d.system_public}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {d.account_public}: "{d.account_jwt}", {d.system_public}: "{d.system_jwt}" }}'
    )


# ---- secured servers, as the tests use them -----------------------------------------------------

METHODS = ("tls_private_ca", "mutual_tls", "user_password", "password_in_url", "token", "nkey_seed", "creds")


@dataclass
class SecureSetup:
    """A nats-server config requiring one way of connecting, and the client variables that satisfy it."""

    config: Path
    port: int
    env: dict[str, str]  # NATS_URL and the credential/TLS variables
    secrets: tuple[str, ...]  # values that must never be shown


def secure_setup(method: str, folder: Path, port: int) -> SecureSetup:
    folder.mkdir(parents=True, exist_ok=True)
    plain, tls_url = f"nats://127.0.0.1:{port}", f"tls://127.0.0.1:{port}"
    password = "pw-" + base64.urlsafe_b64encode(os.urandom(18)).decode()
    if method in ("tls_private_ca", "mutual_tls"):
        pki = make_pki(folder / "pki")
        env = {"NATS_URL": tls_url, "NATS_TLS_CA": str(pki.ca)}
        if method == "mutual_tls":
            env.update(NATS_TLS_CERT=str(pki.client_cert), NATS_TLS_KEY=str(pki.client_key))
        config = write_config(folder, tls=pki, verify_clients=method == "mutual_tls")
        return SecureSetup(config, port, env, (pki.client_key.read_text(),) if method == "mutual_tls" else ())
    if method == "user_password":
        config = write_config(folder, body=users_block(("uploads", password)))
        return SecureSetup(
            config, port, {"NATS_URL": plain, "NATS_USER": "uploads", "NATS_PASSWORD": password}, (password,)
        )
    if method == "password_in_url":
        config = write_config(folder, body=users_block(("uploads", password)))
        return SecureSetup(config, port, {"NATS_URL": f"nats://uploads:{password}@127.0.0.1:{port}"}, (password,))
    if method == "token":
        config = write_config(folder, body=f'authorization {{ token: "{password}" }}')
        return SecureSetup(config, port, {"NATS_URL": plain, "NATS_TOKEN": password}, (password,))
    if method == "nkey_seed":
        user = new_keypair(nkeys.PREFIX_BYTE_USER)
        seed_file = folder / "user.nk"
        seed_file.write_text(seed(user) + "\n")
        seed_file.chmod(0o600)
        config = write_config(folder, body=f'authorization {{ users: [ {{ nkey: "{public(user)}" }} ] }}')
        return SecureSetup(config, port, {"NATS_URL": plain, "NATS_NKEY": str(seed_file)}, (seed(user),))
    if method == "creds":
        d = make_decentralized()
        creds_file = folder / "uploads.creds"
        creds_file.write_text(d.creds_text)
        creds_file.chmod(0o600)
        config = write_config(folder, body=operator_block(d))
        user_jwt = d.creds_text.splitlines()[1]
        return SecureSetup(config, port, {"NATS_URL": plain, "NATS_CREDS": str(creds_file)}, (d.user_seed, user_jwt))
    raise ValueError(method)


def start_secure_server(setup: SecureSetup, store_dir: Path):
    """nats-server on setup.port with the setup's config file (the caller stops it)."""
    from uploads_consumer.embedded import NatsServer

    server = NatsServer(store_dir, port=setup.port, extra_args=["-c", str(setup.config)])
    server.start()
    return server


# ---- talking to the daemon and the CLI ----------------------------------------------------------


def cli(env: dict[str, str], *args: str, timeout: float = 30):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "uploads_consumer", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def acked(daemon) -> float:
    return daemon.metric("uploads_consumer_messages_total", 'outcome="acked"')


async def publish_upload(settings, path: Path, email: str = "secure@example.com", before_publish=None):
    """Encrypt and upload one file as the backend does, and publish its event over `settings`' own
    (authenticated, TLS) connection. `before_publish(event)` may spoil the upload first. Returns the event."""
    from uploads_consumer.connection import connect_once
    from uploads_consumer.envelope import MasterKeyRing
    from uploads_consumer.producer import publish_event, upload_file
    from uploads_consumer.storage import ObjectStore

    current, _ = settings.master_keys()
    nc = await connect_once(settings, "test-publisher")
    try:
        async with ObjectStore(settings) as store:
            event = await upload_file(store, MasterKeyRing(current), path, email, settings.s3_bucket_name)
            if before_publish is not None:
                before_publish(event)
            await publish_event(nc.jetstream(timeout=10), settings.nats_subject, event)
        return event
    finally:
        await nc.close()
