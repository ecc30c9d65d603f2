"""Region keys, the keyring of data keys, key providers (local, AWS KMS, OpenBao) and key
lifecycle. Raw key bytes never leave this package.
"""
