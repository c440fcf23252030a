"""The applications on top of the services and the library; nothing in `tandem`, `tandemrpc` or the services imports
them.

    cli/        the `tandem` command (`apps.cli.main:main`), one module per group of commands
    launch.py   the three services as local processes (`tandem serve`, `tandem demo`, the end-to-end tests)
    bench/      the speed benchmark (`tandem bench`, `tandem bench-report`)
    peer_hf.py  the Hugging Face transformers peer of the benchmark (imports torch: pip install '.[peer]')

`loadtest/` (`tandem loadtest`) is an application too, kept at the top level; it uses `apps.bench`'s statistics,
metrics scraping and stack launch, and the command line imports it, so the order is cli -> loadtest -> bench.
"""
