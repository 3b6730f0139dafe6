"""Finance settlement: dual-controlled bulk detokenization into an OpenPGP-encrypted file.

- ``batch``: pure CSV validation of a capture file (``vaultline settle create``)
- ``fileformat``: the pure processor-file format (VLSF v1) with check values and totals
- ``openpgp``: the only module that runs ``gpg`` (streaming encryption)
- ``job``: the run — BatchDetokenize over mTLS, temp file + fsync + rename, rejects, summary
- ``cli``: ``vaultline settle create|approve|run|status|list``
"""
