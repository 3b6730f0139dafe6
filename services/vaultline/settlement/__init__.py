"""Finance settlement, client side: dual-controlled bulk detokenization into an
OpenPGP-encrypted file. Dual control itself is the tokenizer's (`vaultline.dual_control`,
served as `SettlementService`); nothing here touches the database.

- ``batch``: pure CSV validation of a capture file (``vaultline settle create``)
- ``fileformat``: the pure processor-file format (VLSF v1) with check values and totals
- ``openpgp``: the only module that runs ``gpg`` (streaming encryption)
- ``job``: create/approve/run through SettlementService and BatchDetokenize over mTLS; the
  file through temp file + fsync + rename, rejects, summary

Its commands, ``vaultline settle create|approve|run|status|list``, are ``vaultline.cli.settle``.
"""

from typing import Final

# Tokens per BatchDetokenize chunk of `settle run`. 5,000 settled 300k rows ~10% faster than
# 2,000 (fewer round trips and audit records per row); a chunk's response stays under 1 MB.
DEFAULT_CHUNK: Final = 5000
MAX_CHUNK: Final = 20_000
