"""Finance settlement: dual-controlled bulk detokenization into an OpenPGP-encrypted file.

- ``batch``: pure CSV validation of a capture file (``vaultline settle create``)
- ``fileformat``: the pure processor-file format (VLSF v1) with check values and totals
- ``openpgp``: the only module that runs ``gpg`` (streaming encryption)
- ``job``: the run — BatchDetokenize over mTLS, temp file + fsync + rename, rejects, summary

Its commands, ``vaultline settle create|approve|run|status|list``, are ``vaultline.cli.settle``.
"""

from typing import Final

# Tokens per BatchDetokenize chunk of `settle run`. 5,000 settled 300k rows ~10% faster than
# 2,000 (fewer round trips and audit records per row); a chunk's response stays under 1 MB.
DEFAULT_CHUNK: Final = 5000
MAX_CHUNK: Final = 20_000
