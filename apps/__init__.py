"""The `tandem` command: the application on top of everything else; nothing else imports it.

    cli/        the `tandem` command (`apps.cli.main:main`), one module per group of commands

The other applications are top-level packages of their own, each importing only those below it (the import contracts
in pyproject.toml): `loadtest/` (`tandem loadtest`) uses `benchmark/` (`tandem bench`, `tandem bench-report`, and
the Hugging Face transformers peer, `benchmark/peer_hf.py`), which starts local stacks with `tandemrpc/launch.py` (the
three services as processes: `tandem serve`, `tandem demo`).
"""
