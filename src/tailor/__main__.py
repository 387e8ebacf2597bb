"""`python -m tailor ...` is the `tailor` command (what torchrun runs: `torchrun ... -m tailor train ...`)."""

from tailor.cli import main

if __name__ == "__main__":
    main()
