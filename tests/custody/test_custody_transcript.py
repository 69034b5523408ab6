"""Ceremony transcripts: CMS SignedData signed by the tokens present, verified by us and by OpenSSL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms

from keymgr import errors
from keymgr.custody.transcript import Signer, TranscriptRecorder, hsm_signer, sign_transcript, verify_transcript
from tests._internals import token_of
from tests.custody_helpers import hsm, party, registered


@pytest.fixture(scope="module")
def signed() -> bytes:
    km = hsm()
    custodians = registered(km, 1, 2, 3)  # P-256, RSA-2048 (PSS), P-384
    recorder = TranscriptRecorder("destroy", token_of(km).label, token_of(km).serial)
    for c in custodians:
        recorder.participant("approver", c.name, c.fingerprint)
    recorder.step("version destroyed", version=1)
    recorder.key("orders", 1, b"\x01" * 16, "abc123")
    signers = [hsm_signer(token_of(km))]
    signers += [Signer(c.name, c.certificate_der, party(n).open(c).sign) for n, c in enumerate(custodians, 1)]
    return sign_transcript(recorder.finish("success"), [s for s in signers if s is not None])


def test_every_signature_verifies_here(signed: bytes) -> None:
    verified = verify_transcript(signed)
    assert verified.document["ceremony"] == "destroy" and verified.document["outcome"] == "success"
    assert len(verified.signers) == 4
    assert {name for name, _ in verified.signers} >= {party(n).name for n in (1, 2, 3)}
    assert verified.document["keys"] == [{"name": "orders", "version": 1, "id": "01" * 16, "kcv": "abc123"}]


def test_openssl_cms_verify_accepts_it(signed: bytes, tmp_path: Path) -> None:
    path = tmp_path / "t.p7s"
    path.write_bytes(signed)
    out = tmp_path / "content.json"
    result = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(path), "-noverify",
                             "-out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr
    assert out.read_bytes() == cms.ContentInfo.load(signed)["content"]["encap_content_info"]["content"].native


def test_edits_are_detected(signed: bytes) -> None:
    content = cms.ContentInfo.load(signed)["content"]["encap_content_info"]["content"].native
    at = signed.find(content) + content.find(b"destroy")
    edited = bytearray(signed)
    edited[at] ^= 0x20
    with pytest.raises(errors.IntegrityError, match="does not match its signed digest"):
        verify_transcript(bytes(edited))
    info = cms.ContentInfo.load(signed)
    signer_infos = info["content"]["signer_infos"]
    sig = bytearray(signer_infos[0]["signature"].native)
    sig[len(sig) // 2] ^= 0x01
    signer_infos[0]["signature"] = bytes(sig)
    with pytest.raises(errors.IntegrityError, match="does not verify"):
        verify_transcript(cms.ContentInfo.load(info.dump(force=True)).dump())
    stripped = cms.ContentInfo.load(signed)
    stripped["content"]["certificates"] = []
    with pytest.raises(errors.IntegrityError, match="certificate is missing"):
        verify_transcript(stripped.dump(force=True))


def test_garbage_is_a_format_error() -> None:
    for garbage in (b"", b"\x30\x00", b"not a transcript", cms.ContentInfo({"content_type": "data",
                                                                             "content": b"x"}).dump()):
        with pytest.raises(errors.FormatError):
            verify_transcript(garbage)
