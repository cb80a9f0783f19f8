"""The robot link secured (issue 12, item 3): a real actor daemon serving RobotLink over mutual
TLS and/or with a bearer token, and real clients (RobotLinkClient) that have the right
certificate / token or not. The certificates are made here with `cryptography`: a CA, a server
certificate for 127.0.0.1 / localhost, a client certificate, and a second CA nobody trusts.
Also: the configuration keys ([grpc] tls_cert, tls_key, client_ca, token, token_file, insecure)
and the refusal to serve a non-loopback address without TLS or a token."""
from __future__ import annotations

import datetime
import ipaddress
import logging
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetloop.actor.config import ConfigError, load_actor_config
from fleetloop.actor.daemon import ActorDaemon, FixedPolicySource
from fleetloop.actor.link import LinkSecurity, RobotLinkClient, is_loopback
from fleetloop.actor.spool import Spool
from fleetloop.buffer.store import LocalStore
from fleetloop.policy.interface import Observation
from fleetloop.proto.v1 import episode_pb2 as pb

from test_robot_contract import SpecPolicy

TOKEN = "robot-link-token-0123456789abcdef"


# -- certificates ---------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert) -> tuple[Path, Path]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (path / "key.pem").chmod(0o600)
    return path / "cert.pem", path / "key.pem"


def make_ca(path: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(path, key, cert)
    return key, cert


def make_leaf(path: Path, ca, cn: str, server: bool):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return _write(path, key, b.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca", "fleetloop test CA")
    rogue = make_ca(root / "rogue-ca", "someone else's CA")
    return {"ca": root / "ca" / "cert.pem",
            "server": make_leaf(root / "server", ca, "arm-07 robot link", server=True),
            "client": make_leaf(root / "client", ca, "arm-07 control stack", server=False),
            "rogue_client": make_leaf(root / "rogue-client", rogue, "not ours", server=False),
            "rogue_ca": root / "rogue-ca" / "cert.pem"}


def start_daemon(tmp_path, redis_client, security: LinkSecurity, address: str = "127.0.0.1:0") -> ActorDaemon:
    return ActorDaemon("robot-1", LocalStore(tmp_path / "store"), redis_client, Spool(tmp_path / "spool"),
                       FixedPolicySource(SpecPolicy()), grpc_address=address, heartbeat_interval_s=0.2,
                       link_security=security).start()


def one_episode(client: RobotLinkClient) -> int:
    rng = np.random.default_rng(0)
    client.start_episode("reach-v3", "reach")
    for _ in range(3):
        obs = Observation(images={"front": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)},
                          state=rng.standard_normal(6).astype(np.float32))
        chunk = client.act(obs)
        client.report_step(obs, chunk[0], intervention=False)
    return client.end_episode(pb.OUTCOME_SUCCESS).num_steps


def refused(client: RobotLinkClient) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        client.get_spec()
    client.close()
    return e.value


# -- mutual TLS ------------------------------------------------------------------------------------

def test_mutual_tls(tmp_path, redis_client, pki):
    cert, key = pki["server"]
    d = start_daemon(tmp_path, redis_client, LinkSecurity.from_files(cert, key, client_ca=pki["ca"]))
    try:
        addr = f"127.0.0.1:{d.port}"
        ccert, ckey = pki["client"]
        good = RobotLinkClient(addr, "robot-1", timeout_s=10, root_ca=pki["ca"], client_cert=ccert, client_key=ckey)
        assert good.get_spec().robot_id == "robot-1"
        assert one_episode(good) == 3
        good.close()
        # by name, with the PEM bytes instead of paths
        by_name = RobotLinkClient(f"localhost:{d.port}", timeout_s=10, root_ca=pki["ca"].read_bytes(),
                                  client_cert=ccert.read_bytes(), client_key=ckey.read_bytes())
        assert by_name.status().robot_id == "robot-1"
        by_name.close()

        # no client certificate: the handshake fails, nothing is served
        e = refused(RobotLinkClient(addr, timeout_s=5, root_ca=pki["ca"]))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        # a certificate from a CA the daemon does not trust
        rcert, rkey = pki["rogue_client"]
        e = refused(RobotLinkClient(addr, timeout_s=5, root_ca=pki["ca"], client_cert=rcert, client_key=rkey))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext against a TLS link
        e = refused(RobotLinkClient(addr, timeout_s=5))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        # the client does not trust the daemon's certificate (another CA)
        e = refused(RobotLinkClient(addr, timeout_s=5, root_ca=pki["rogue_ca"], client_cert=ccert, client_key=ckey))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert d.open_episode is None and d.counters.episodes == 1  # only the good client recorded
    finally:
        d.stop()


# -- bearer token ---------------------------------------------------------------------------------

def test_token_over_plaintext_loopback(tmp_path, redis_client):
    d = start_daemon(tmp_path, redis_client, LinkSecurity(tokens=(TOKEN,)))
    try:
        e = refused(RobotLinkClient(d.address, timeout_s=5))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing robot link token" in e.details() and "authorization: Bearer" in e.details()
        e = refused(RobotLinkClient(d.address, timeout_s=5, token=TOKEN + "x"))
        assert (e.code(), e.details()) == (grpc.StatusCode.UNAUTHENTICATED, "wrong robot link token")
        assert TOKEN not in e.details()
        ok = RobotLinkClient(d.address, "robot-1", timeout_s=10, token=TOKEN)
        assert one_episode(ok) == 3
        ok.close()
        assert d.counters.episodes == 1
    finally:
        d.stop()


def test_token_with_tls_and_a_token_file(tmp_path, redis_client, pki):
    """TLS without client certificates + tokens from a file (two during a rotation)."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# robot link tokens\n{TOKEN}\nnext-token-abcdefghijklmnop\n")
    cert, key = pki["server"]
    d = start_daemon(tmp_path, redis_client, LinkSecurity.from_files(cert, key, token_file=token_file))
    try:
        addr = f"127.0.0.1:{d.port}"
        for token in (TOKEN, "next-token-abcdefghijklmnop"):
            c = RobotLinkClient(addr, timeout_s=10, root_ca=pki["ca"], token=token)
            assert c.get_spec().robot_id == "robot-1"
            c.close()
        e = refused(RobotLinkClient(addr, timeout_s=5, root_ca=pki["ca"], token="wrong-token-0123456789"))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        e = refused(RobotLinkClient(addr, timeout_s=5, root_ca=pki["ca"]))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        d.stop()


# -- where the link may listen ------------------------------------------------------------------

def test_no_open_link_on_the_network(tmp_path, redis_client, caplog):
    for addr in ("127.0.0.1:1", "[::1]:1", "localhost:1", "unix:/run/fleetloop/actor.sock"):
        assert is_loopback(addr), addr
    for addr in ("0.0.0.0:1", "[::]:1", "10.0.0.7:1", "robot.local:1"):
        assert not is_loopback(addr), addr
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:0, which is not loopback, with no authentication"):
        start_daemon(tmp_path, redis_client, LinkSecurity(), address="0.0.0.0:0")
    with pytest.raises(ValueError, match="at least 16 characters"):
        LinkSecurity(tokens=("short",))
    with caplog.at_level(logging.WARNING, logger="fleetloop.actor.daemon"):
        d = start_daemon(tmp_path, redis_client, LinkSecurity(tokens=(TOKEN,)), address="0.0.0.0:0")
    try:
        assert "the token travels in plaintext" in caplog.text
        c = RobotLinkClient(f"127.0.0.1:{d.port}", timeout_s=10, token=TOKEN)
        assert c.get_spec().robot_id == "robot-1"
        c.close()
    finally:
        d.stop()


# -- configuration ----------------------------------------------------------------------------

def config_file(tmp_path: Path, grpc_lines: str) -> Path:
    p = tmp_path / "actor.toml"
    p.write_text(textwrap.dedent(f"""
        robot_id = "robot-1"
        [cloud]
        store = "file://{tmp_path}/store"
        redis_url = "redis://127.0.0.1:6379/0"
        [spool]
        dir = "{tmp_path}/spool"
        [grpc]
    """) + textwrap.dedent(grpc_lines))
    p.chmod(0o600)
    return p


def test_config_keys_build_the_link_security(tmp_path, redis_client, pki):
    cert, key = pki["server"]
    cfg = load_actor_config(config_file(tmp_path, f"""
        address = "0.0.0.0:0"
        tls_cert = "{cert}"
        tls_key = "{key}"
        client_ca = "{pki['ca']}"
    """), env={"FLEETLOOP_GRPC_TOKEN": TOKEN})
    assert cfg.grpc_tls_cert == cert and cfg.grpc_token == TOKEN
    assert TOKEN not in repr(cfg) and cfg.redacted()["grpc_token"] == "***"
    sec = cfg.link_security()
    assert sec.mutual_tls and sec.tokens == (TOKEN,) and sec.describe() == "mutual TLS + bearer token (1 accepted)"
    d = start_daemon(tmp_path, redis_client, sec, address=cfg.grpc_address)
    try:
        ccert, ckey = pki["client"]
        c = RobotLinkClient(f"127.0.0.1:{d.port}", timeout_s=10, root_ca=pki["ca"], client_cert=ccert,
                            client_key=ckey, token=TOKEN)
        assert c.get_spec().robot_id == "robot-1"
        c.close()
        e = refused(RobotLinkClient(f"127.0.0.1:{d.port}", timeout_s=5, root_ca=pki["ca"], client_cert=ccert,
                                    client_key=ckey))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS passed, the token did not
    finally:
        d.stop()
    # relative paths are relative to the config file; insecure from the environment
    cfg = load_actor_config(config_file(tmp_path, 'address = "0.0.0.0:50051"\n'), env={"FLEETLOOP_GRPC_INSECURE": "1"})
    assert cfg.grpc_insecure and not cfg.link_security().tls


def check_error(tmp_path, grpc_lines: str, *patterns: str, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_actor_config(config_file(tmp_path, grpc_lines), env=env or {})
    for p in patterns:
        assert any(__import__("re").search(p, line) for line in e.value.errors), (p, e.value.errors)
    return e.value


def test_config_errors(tmp_path, pki):
    cert, key = pki["server"]
    ccert, ckey = pki["client"]
    check_error(tmp_path, 'address = "0.0.0.0:50051"\n', r"^grpc\.address: .*not loopback.*tls_cert.*token.*insecure")
    check_error(tmp_path, 'address = "10.1.2.3:50051"\ninsecure = "maybe"\n', r"grpc\.insecure.*true or false")
    check_error(tmp_path, f'tls_cert = "{cert}"\n', r"grpc\.tls_key is missing.*grpc\.tls_cert")
    check_error(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{ckey}"\n', r"grpc\.tls_key.*does not belong to the certificate")
    check_error(tmp_path, f'tls_cert = "{key}"\ntls_key = "{cert}"\n', r"grpc\.tls_cert.*not PEM certificate",
                r"grpc\.tls_key.*not an unencrypted PEM private key")
    check_error(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{tmp_path}/nope.pem"\n', r"grpc\.tls_key.*does not exist")
    check_error(tmp_path, f'client_ca = "{pki["ca"]}"\n', r"client certificates need TLS")
    check_error(tmp_path, 'token = "short"\n', r"grpc\.token.*at least 16 characters")
    (tmp_path / "empty").write_text("# nothing\n")
    check_error(tmp_path, f'token_file = "{tmp_path}/empty"\n', r"grpc\.token_file.*holds no token")
    (tmp_path / "tok").write_text(TOKEN + "\n")
    check_error(tmp_path, f'token_file = "{tmp_path}/tok"\n', r"both set: use one", env={"FLEETLOOP_GRPC_TOKEN": TOKEN})
    check_error(tmp_path, 'tls_certificate = "x"\n', r"unknown key grpc\.tls_certificate.*did you mean 'tls_cert'")


def test_example_config_documents_every_grpc_key():
    from fleetloop.actor.config import KEYS
    text = (Path(__file__).resolve().parents[1] / "deploy" / "robot" / "actor.example.toml").read_text()
    for k in KEYS:
        if k.section == "grpc":
            assert f"{k.key} = " in text and k.env[0] in text, k.key
