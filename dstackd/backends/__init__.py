"""Backends: where instances come from (this machine, SSH hosts, AWS EC2)."""
