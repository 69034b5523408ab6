"""``keymgr token ...``: key pairs on tokens (custodian keys, recipients' keys).

``keygen`` makes a key pair on the token (where the token allows on-card
generation) and prints its public key (PEM) and its RFC 7512 URI; ``pubkey``
prints both for a key pair that exists already (a PIV slot key, a key made
by the vendor's tool), found by a URI such as
``pkcs11:token=YubiKey%20PIV;object=SIGN%20key;type=private``. The public key
is what encrypting parties need: ``KeyManager.encrypt(..., also_to=[
keymgr.envelope.pubkey.public_key_recipient(pem)])`` needs no token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from keymgr import errors
from keymgr.cli._common import CliState, emit_json, pass_state

__all__ = ["token_group"]

KEYGEN_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


def _open(state: CliState, token: str | None) -> Any:
    from keymgr.hsm import Pkcs11Uri, open_token

    text = token or state.token
    if not text:
        raise errors.ConfigurationError("name the token: --token 'pkcs11:token=...?module-path=...'")
    uri = Pkcs11Uri.parse(text)
    return uri, open_token(uri.token_only().with_(pin_value=uri.pin_value, pin_source=uri.pin_source))


def _report(state: CliState, uri: Any, ts: Any, ref: Any, out: Path | None) -> None:
    from keymgr.hsm import asym, probe

    public = asym.public_key(ts, ref)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_uri = uri.token_only().with_(token=ts.label, serial=ts.serial, object=ref.label, id=ref.key_id,
                                     type="private")
    info: dict[str, Any] = {"token": ts.label, "label": ref.label, "id": ref.key_id.hex(), "type": ref.kind,
                            "uri": str(key_uri), "public_key_pem": pem.decode()}
    if ref.is_rsa:
        info["scheme"] = "rsa-oaep"
        info["oaep_hash"] = probe(ts).oaep_hash()
    else:
        info["scheme"] = "ecdh" if probe(ts).has(f"ecdh-{ref.kind[3:]}") else "sign-only"
    if out is not None:
        from keymgr._files import atomic_write

        atomic_write(out, pem)
    if state.json_output:
        emit_json(info)
        return
    click.echo(pem.decode(), nl=False)
    click.echo(f"uri: {key_uri}")
    if ref.is_rsa and info["oaep_hash"]:
        click.echo(f"encrypt to it with RSA-OAEP-{info['oaep_hash'].upper()} (what this token decrypts)")


@click.group("token")
def token_group() -> None:
    """Key pairs on tokens: generate one, or show an existing one's public key."""


@token_group.command("keygen")
@click.option("--token", "token", metavar="URI", help="pkcs11: URI of the token (default: the global --token).")
@click.option("--type", "kind", type=click.Choice(KEYGEN_TYPES), required=True, help="Key pair type.")
@click.option("--label", required=True, help="CKA_LABEL of the new key pair (must not exist yet).")
@click.option("--id", "key_id", metavar="HEX", help="CKA_ID in hex (default: 16 random bytes).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the PEM to this file.")
@pass_state
def keygen_command(state: CliState, token: str | None, kind: str, label: str, key_id: str | None,
                   out: Path | None) -> None:
    """Generate a key pair on the token; print its public key (PEM) and URI."""
    from keymgr.hsm import asym

    try:
        raw_id = bytes.fromhex(key_id) if key_id else None
    except ValueError:
        raise errors.ConfigurationError("--id must be hex") from None
    uri, ts = _open(state, token)
    _report(state, uri, ts, asym.generate_keypair(ts, kind, label=label, key_id=raw_id), out)


@token_group.command("pubkey")
@click.argument("key_uri", metavar="KEY_URI")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the PEM to this file.")
@pass_state
def pubkey_command(state: CliState, key_uri: str, out: Path | None) -> None:
    """Print the public key (PEM) and URI of an existing key pair, named by a URI with
    ``object=`` and/or ``id=`` (e.g. a PIV slot key)."""
    from keymgr.hsm import asym

    uri, ts = _open(state, key_uri)
    if uri.object is None and uri.id is None:
        raise errors.ConfigurationError("the key URI needs object=LABEL or id=... (and type=private)")
    _report(state, uri, ts, asym.find_keypair(ts, label=uri.object, key_id=uri.id), out)


@token_group.command("keys")
@click.option("--token", "token", metavar="URI", help="pkcs11: URI of the token (default: the global --token).")
@pass_state
def keys_command(state: CliState, token: str | None) -> None:
    """List the key pairs keymgr can use on the token (RSA 2048-4096, EC P-256 / P-384)."""
    from keymgr.hsm import asym

    uri, ts = _open(state, token)
    pairs = asym.list_keypairs(ts)
    rows = [{"label": r.label, "id": r.key_id.hex(), "type": r.kind,
             "uri": str(uri.token_only().with_(token=ts.label, serial=ts.serial, object=r.label, id=r.key_id,
                                               type="private"))} for r in pairs]
    if state.json_output:
        emit_json({"token": ts.label, "key_pairs": rows})
        return
    for row in rows:
        click.echo(f"{row['type']:9} {row['label']}  {row['uri']}")
