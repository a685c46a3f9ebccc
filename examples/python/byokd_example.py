#!/usr/bin/env python3
"""byokd from Python: the orchestrator stores and leases a user's key; the agent redeems it.

    python3 examples/python/byokd_example.py --target 127.0.0.1:50051 \
        --orchestrator-token "$ORCH_TOKEN" --agent-token "$AGENT_TOKEN"

The orchestrator's principal needs the writer and leaser roles, the agent's the reader role
(one admin token, e.g. the bootstrap token, can play both). Defaults come from BYOKD_TARGET and
BYOKD_TOKEN. Exits 0 and prints "example ok" last only if everything behaved as expected.
"""

import argparse
import os
import secrets
import sys
import tempfile
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

import generate_stubs

# Compile proto/byokd/v1/vault.proto into a throwaway directory and import the result, so the
# example always matches the proto it sits next to.
_STUBS = tempfile.TemporaryDirectory(prefix="byokd-stubs-")
generate_stubs.generate(Path(_STUBS.name))
sys.path.insert(0, _STUBS.name)
from byokd.v1 import vault_pb2 as pb  # noqa: E402
from byokd.v1 import vault_pb2_grpc as pb_grpc  # noqa: E402

RPC_TIMEOUT = 10  # seconds; always set a deadline on calls


class Unexpected(Exception):
    """The server did something the example did not expect: exit non-zero."""


def connect(target: str, ca_cert: str | None) -> grpc.Channel:
    """A channel that has reached the server (TLS if a CA file is given, else plaintext)."""
    if ca_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)  # byokd allows plaintext on loopback only
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
    return channel


def bearer(token: str) -> tuple:
    """Call metadata authenticating a principal."""
    return (("authorization", f"Bearer {token}"),)


def expect_code(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    """Run an RPC that must fail with `code`; return the error."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        if err.code() != code:
            raise
        return err
    raise Unexpected(f"expected {code.name}, but the call succeeded")


# --- Orchestrator: owns users' keys; hands out short-lived, single-use leases. -------------

def orchestrator_store_and_lease(channel: grpc.Channel, token: str, tenant: str, name: str,
                                  value: bytes) -> str:
    vault = pb_grpc.VaultStub(channel)
    auth = bearer(token)

    meta = vault.Store(
        pb.StoreRequest(tenant=tenant, name=name, provider="anthropic", value=value,
                        labels={"user": "42", "source": "python-example"}),
        metadata=auth, timeout=RPC_TIMEOUT)
    # Metadata never carries the value; `hint` is a short non-secret fingerprint.
    print(f"orchestrator: stored {meta.tenant}/{meta.name} v{meta.version} id={meta.id} "
          f"hint={meta.hint!r}")

    grant = vault.Lease(
        pb.LeaseRequest(tenant=tenant, name=name, ttl=Duration(seconds=30), max_uses=1),
        metadata=auth, timeout=RPC_TIMEOUT)
    print(f"orchestrator: lease {grant.lease_id} for v{grant.version}, "
          f"{grant.max_uses} use(s), expires {grant.expires_at.ToJsonString()}")
    # The token is the capability handed to the agent (e.g. in its sandbox's environment).
    # It is single-use and short-lived; it is printed here only because this is a demo.
    print(f"orchestrator: lease token {grant.token}")
    return grant.token


def orchestrator_cleanup(channel: grpc.Channel, token: str, tenant: str, name: str) -> None:
    """Revoke the demo secret: every version is destroyed, the metadata stays as a tombstone."""
    vault = pb_grpc.VaultStub(channel)
    resp = vault.Revoke(
        pb.RevokeRequest(secret=pb.SecretRef(tenant=tenant, name=name), reason="python example done"),
        metadata=bearer(token), timeout=RPC_TIMEOUT)
    if resp.secret.state != pb.SECRET_STATE_REVOKED:
        raise Unexpected(f"revoked secret is in state {pb.SecretState.Name(resp.secret.state)}")
    print(f"orchestrator: revoked {tenant}/{name}")


# --- Agent: another process that only ever sees the lease token. --------------------------

def agent_redeem(target: str, ca_cert: str | None, token: str, lease_token: str) -> bytes:
    with connect(target, ca_cert) as channel:  # its own channel, as if in another process
        vault = pb_grpc.VaultStub(channel)
        auth = bearer(token)

        secret = vault.Get(pb.GetRequest(token=lease_token), metadata=auth, timeout=RPC_TIMEOUT)
        # Use secret.value to call the provider; never log it.
        print(f"agent: got {len(secret.value)} bytes for provider {secret.provider!r} "
              f"(v{secret.version}, {secret.remaining_uses} use(s) left)")

        # The lease was single-use: a second redemption is NOT_FOUND. byokd gives the same
        # answer for every failed redemption (expired, used up, revoked, ...).
        err = expect_code(grpc.StatusCode.NOT_FOUND, vault.Get, pb.GetRequest(token=lease_token),
                          metadata=auth, timeout=RPC_TIMEOUT)
        print(f"agent: second Get -> {err.code().name} ({err.details()})")
        return secret.value


def error_handling_demo(channel: grpc.Channel, token: str, tenant: str) -> None:
    """Errors are grpc.RpcError with a status code; branch on the code, not the message."""
    vault = pb_grpc.VaultStub(channel)
    try:
        vault.Lease(pb.LeaseRequest(tenant=tenant, name="no-such-secret-" + secrets.token_hex(4)),
                    metadata=bearer(token), timeout=RPC_TIMEOUT)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        print(f"errors: Lease of an unknown secret -> {err.code().name} ({err.details()})")
    else:
        raise Unexpected("Lease of an unknown secret succeeded")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("BYOKD_TARGET", "127.0.0.1:50051"),
                        help="host:port of byokd (env BYOKD_TARGET)")
    parser.add_argument("--orchestrator-token", default=os.environ.get("BYOKD_TOKEN"),
                        help="token of a writer+leaser principal (env BYOKD_TOKEN)")
    parser.add_argument("--agent-token", default=os.environ.get("BYOKD_TOKEN"),
                        help="token of a reader principal (env BYOKD_TOKEN)")
    parser.add_argument("--tenant", default="acme", help="tenant to work in (default acme)")
    parser.add_argument("--ca-cert", help="PEM CA bundle: use TLS instead of plaintext")
    args = parser.parse_args()
    if not args.orchestrator_token or not args.agent_token:
        parser.error("give --orchestrator-token and --agent-token, or set BYOKD_TOKEN")

    # A fresh name per run, so the example can run repeatedly against the same server.
    name = f"user-42.anthropic.{secrets.token_hex(4)}"
    value = f"sk-ant-example-{secrets.token_urlsafe(24)}".encode()

    try:
        with connect(args.target, args.ca_cert) as channel:
            lease_token = orchestrator_store_and_lease(channel, args.orchestrator_token, args.tenant,
                                                       name, value)
            got = agent_redeem(args.target, args.ca_cert, args.agent_token, lease_token)
            if not secrets.compare_digest(got, value):
                raise Unexpected("the agent received a different value than was stored")
            error_handling_demo(channel, args.orchestrator_token, args.tenant)
            orchestrator_cleanup(channel, args.orchestrator_token, args.tenant, name)
    except grpc.RpcError as err:
        print(f"error: unexpected {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except grpc.FutureTimeoutError:
        print(f"error: could not connect to {args.target}", file=sys.stderr)
        return 1
    except Unexpected as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    print("example ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
