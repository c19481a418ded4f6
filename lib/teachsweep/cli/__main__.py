"""`python -m teachsweep.cli`: the console entry point, as cluster jobs call it."""

from teachsweep.cli.app import main

if __name__ == "__main__":  # pragma: no cover - python -m teachsweep.cli
    main()
