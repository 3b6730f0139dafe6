"""Call recordings: the DTMF detector, audio, ingest, certification and the recording store."""
