"""``keymgr token ...``: key pairs on tokens (custodian keys, recipients' keys).

``keygen`` makes a key pair on the token (where the token allows on-card
generation) and prints its public key (PEM) and its RFC 7512 URI; with
``--cert`` the token also signs a self-signed certificate for it, stored
beside the pair (same CKA_ID). ``pubkey`` prints the same for a key pair that
exists already (a PIV slot key, a key made by the vendor's tool), found by a
URI such as ``pkcs11:token=YubiKey%20PIV;object=SIGN%20key;type=private``,
with its certificate if the token holds one; ``import-cert`` stores a
certificate (a CA-issued one) beside a pair.

What encrypting parties need is the recipient file: ``--out FILE`` writes the
certificate (or public key) as PEM with a line stating the OAEP hash the token
decrypts, and ``--json`` prints the recipient descriptor
(:mod:`keymgr.recipients.recipient_files`); either is what ``keymgr encrypt
--recipient FILE`` takes, without a token or PIN.
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
_TOKEN_HELP = "pkcs11: URI of the token (default: the global --token, else the local token)."
_OUT_HELP = ("Also write the recipient file: the certificate (or public key) as PEM, with a line stating the "
             "OAEP hash this token decrypts; what `keymgr encrypt --recipient` takes.")


def _open(state: CliState, token: str | None) -> Any:
    from keymgr.hsm import Pkcs11Uri, open_token

    text = token or state.token_uri
    if not text:  # the local token, as for every other command
        from keymgr.hsm.local import LocalToken

        local = LocalToken.default()
        local.activate()
        text = local.uri()
    uri = Pkcs11Uri.parse(text)
    return uri, open_token(uri.token_only().with_(pin_value=uri.pin_value, pin_source=uri.pin_source))


def _check_out(out: Path | None) -> None:
    """--out refused before a key pair is made for it (a link, a directory, no such directory)."""
    if out is not None:
        from keymgr.cli._output import checked_output

        checked_output(str(out))


def _report(state: CliState, uri: Any, ts: Any, ref: Any, out: Path | None) -> None:
    from cryptography import x509

    from keymgr.hsm import asym, probe
    from keymgr.hsm.certificates import find_certificates
    from keymgr.recipients.identities import certificate_of
    from keymgr.recipients.recipient_files import DESCRIPTOR_VERSION, annotated_pem

    public = asym.public_key(ts, ref)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    certificates = certificate_of(public, find_certificates(ts, ref.key_id))
    cert_pem = (x509.load_der_x509_certificate(certificates[0]).public_bytes(serialization.Encoding.PEM)
                if certificates else None)
    key_uri = uri.token_only().with_(token=ts.label, serial=ts.serial, object=ref.label, id=ref.key_id,
                                     type="private")
    info: dict[str, Any] = {"keymgr_recipient": DESCRIPTOR_VERSION, "token": ts.label, "label": ref.label,
                            "id": ref.key_id.hex(), "type": ref.kind, "uri": str(key_uri),
                            "public_key_pem": pem.decode()}
    if cert_pem is not None:
        info["certificate_pem"] = cert_pem.decode()
    if ref.is_rsa:
        info["scheme"] = "rsa-oaep"
        info["oaep_hash"] = probe(ts).oaep_hash()
        info["oaep_hashes"] = list(probe(ts).oaep_hashes())
    else:
        info["scheme"] = "ecdh" if probe(ts).has(f"ecdh-{ref.kind[3:]}") else "sign-only"
    if out is not None:
        from keymgr.cli._output import write_output

        about = f"{ref.kind} key pair {ref.label!r} on token {ts.label!r}"
        write_output(out, annotated_pem(cert_pem or pem, about=about, oaep_hash=info.get("oaep_hash")))
    if state.json_output:
        emit_json(info)
        return
    click.echo(pem.decode(), nl=False)
    if cert_pem is not None:
        click.echo(cert_pem.decode(), nl=False)
    click.echo(f"uri: {key_uri}")
    if ref.is_rsa and info["oaep_hash"]:
        click.echo(f"encrypt to it with RSA-OAEP-{info['oaep_hash'].upper()} (what this token decrypts)")


@click.group("token")
def token_group() -> None:
    """Key pairs on tokens: generate one, or show an existing one's public key."""


@token_group.command("keygen")
@click.option("--token", "token", metavar="URI", help=_TOKEN_HELP)
@click.option("--type", "kind", type=click.Choice(KEYGEN_TYPES), required=True, help="Key pair type.")
@click.option("--label", required=True, help="CKA_LABEL of the new key pair (must not exist yet).")
@click.option("--id", "key_id", metavar="HEX", help="CKA_ID in hex (default: 16 random bytes).")
@click.option("--cert", "make_cert", is_flag=True,
              help="Also make a self-signed certificate (CN = the label), signed and stored by the token.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help=_OUT_HELP)
@pass_state
def keygen_command(state: CliState, token: str | None, kind: str, label: str, key_id: str | None, make_cert: bool,
                   out: Path | None) -> None:
    """Generate a key pair on the token; print its public key (PEM), certificate and URI.
    Recorded in the default audit log (op ``keygen``; no KeyManager here: the pair may be on
    a custodian's or a smart card's token that holds no keyring)."""
    from keymgr.audit import standalone_operation
    from keymgr.hsm import asym

    try:
        raw_id = bytes.fromhex(key_id) if key_id else None
    except ValueError:
        raise errors.ConfigurationError("--id must be hex") from None
    _check_out(out)
    uri, ts = _open(state, token)
    detail: dict[str, object] = {"type": kind, "label": label, "token": ts.label, "certificate": make_cert}
    with standalone_operation("keygen", local=not (token or state.token_uri), detail=detail):
        ref = asym.generate_keypair(ts, kind, label=label, key_id=raw_id)
        detail["key_id"] = ref.key_id.hex()  # the entry is written as the block ends
        if make_cert:
            from keymgr.recipients.token_keys import self_signed_certificate

            self_signed_certificate(ts, ref)
    _report(state, uri, ts, ref, out)


@token_group.command("pubkey")
@click.argument("key_uri", metavar="KEY_URI")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help=_OUT_HELP)
@pass_state
def pubkey_command(state: CliState, key_uri: str, out: Path | None) -> None:
    """Print the public key (PEM), certificate (if the token holds one) and URI of an existing
    key pair, named by a URI with ``object=`` and/or ``id=`` (e.g. a PIV slot key)."""
    _check_out(out)
    uri, ts = _open(state, key_uri)
    _report(state, uri, ts, _find(uri, ts), out)


@token_group.command("import-cert")
@click.argument("key_uri", metavar="KEY_URI")
@click.argument("cert_file", metavar="CERT", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@pass_state
def import_cert_command(state: CliState, key_uri: str, cert_file: Path) -> None:
    """Store CERT (PEM or DER, e.g. issued by your CA) beside the key pair KEY_URI names, so that
    messages naming it by issuer and serial number find the pair."""
    from keymgr.recipients.token_keys import attach_certificate

    uri, ts = _open(state, key_uri)
    ref = _find(uri, ts)
    attach_certificate(ts, ref, cert_file.read_bytes())
    _report(state, uri, ts, ref, None)


def _find(uri: Any, ts: Any) -> Any:
    from keymgr.hsm import asym

    if uri.object is None and uri.id is None:
        raise errors.ConfigurationError("the key URI needs object=LABEL or id=... (and type=private)")
    return asym.find_keypair(ts, label=uri.object, key_id=uri.id)


@token_group.command("keys")
@click.option("--token", "token", metavar="URI", help=_TOKEN_HELP)
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
