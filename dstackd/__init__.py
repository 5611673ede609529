"""The dstackd daemon: decides, acts on backends and serves the Unix socket."""
