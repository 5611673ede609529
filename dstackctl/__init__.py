"""dstackctl: the command-line client of dstackd."""
