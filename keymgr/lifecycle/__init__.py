"""A key's life after creation: rotation, usage limits, destruction.

- :mod:`keymgr.lifecycle.rotation`: new versions, states, retirement.
- :mod:`keymgr.lifecycle.usage`: how many times a version has encrypted; auto-rotation.
- :mod:`keymgr.lifecycle.shred`: crypto-shredding, guarded by custody approvals and a rewrap check.

Layer: above :mod:`keymgr.custody` and :mod:`keymgr.rewrap` (shredding needs both); below the manager.
"""
