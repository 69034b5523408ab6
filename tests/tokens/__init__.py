"""Real PKCS#11 tokens for the test suite, other than the per-run SoftHSM tokens."""
