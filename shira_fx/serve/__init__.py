"""Serving adapters on one base model: `bank` (load, activate, fuse, deactivate in place),
`mixed` (a batch whose rows use different adapters), `gate` (the reader-writer lock requests
and switches meet at), `slots` (what a bank holds per adapter and layer), `export`
(quantized bases as plain dense layers for deployment)."""
