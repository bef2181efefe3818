"""Encryption at rest: envelope encryption under a master key.

Every stored version of a secret is sealed on its own:

1. a fresh random 256-bit *data key* encrypts the value with AES-256-GCM (random 12-byte nonce);
   the associated data is the secret's name and version, so a ciphertext moved to another slot
   does not decrypt;
2. the *master key* wraps the data key with RFC 3394 AES key wrap;
3. the store keeps the master key's id, the wrapped data key, the nonce and the ciphertext
   (:class:`~secretfs.crypto.envelope.SealedValue`), and never the data key.

The master key comes from a provider (:func:`~secretfs.crypto.keys.load_master_key`): a 0600 key
file, a passphrase through scrypt, or the OS keychain.

Nothing is imported here, so that ``import secretfs.crypto.envelope`` pulls in only AES-GCM and
key wrap; import :mod:`secretfs.crypto.envelope` and :mod:`secretfs.crypto.keys` directly.
"""
