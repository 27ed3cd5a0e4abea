"""The `keel` command line: the one layer that imports both `keel.training` and `keel.service`.

main.py builds the parser and runs a command; each command group (train, eval, export, serve) is one module
here that adds its parsers and sets the function that runs them (`set_defaults(func=...)`).
"""
