"""The `tandem` command (`apps.cli.main:main`), one module per group of commands; see `main.py`."""
