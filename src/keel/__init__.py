"""Keel: train reward and moderation models from human feedback, tune policies against them, and serve scores,
moderation and guarded chat over HTTP.

One namespace, four layers (docs/architecture.md): `keel.cli` (the command line) on top; `keel.service` (the HTTP
service, from service/) and `keel.training` (training and evaluation, from training/) beside each other; and
`keel.core`, what both need, at the bottom.
"""

__version__ = "0.1.0"
