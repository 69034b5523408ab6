"""Kept for 0.1.0 user code: ``from keymgr.local import LocalToken`` (the old quickstart).

The local SoftHSM token is part of the token layer now, :mod:`keymgr.hsm.local`; this
module only re-exports its public names, so programs written against the published
example keep working. New code imports :mod:`keymgr.hsm.local`.
"""

from keymgr.hsm.local import LOCAL_TOKEN_LABEL, PIN_ENV_VAR, InitResult, LocalToken, keymgr_home

__all__ = ["LocalToken", "InitResult", "keymgr_home", "LOCAL_TOKEN_LABEL", "PIN_ENV_VAR"]
