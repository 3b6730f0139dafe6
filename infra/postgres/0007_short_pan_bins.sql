-- Issue 14: no token and no metadata shows more than the first six and last four digits of a
-- card number, and for one shorter than 16 digits never more than the last four (six and four
-- of twelve would leave two hidden). New rows store no BIN for such cards; this clears it on
-- the rows of numeric tokens, whose length is the card number's. An opaque token's row does
-- not tell the card's length without decrypting it: those keep their BIN (see the issue note).
UPDATE tokens SET bin = '' WHERE format IN (1, 2) AND length(token) < 16;
