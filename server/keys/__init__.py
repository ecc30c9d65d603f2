"""Region keys (`region`), the keyring of data keys (`keyring`), key providers (`providers`:
local, AWS KMS, OpenBao) and key lifecycle (`lifecycle`). Raw key bytes never leave this
package; the sealing values they bind (associated data, `DataKey`) are in `core.sealing`.
"""
