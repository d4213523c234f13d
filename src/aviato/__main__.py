"""`python -m aviato`: the same command line as the `aviato` console script."""

from aviato.cli.main import main

if __name__ == "__main__":
    main()
