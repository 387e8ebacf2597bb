"""`python -m tailor.cli ...`, as the tests and the launcher's subprocesses call it."""

from tailor.cli import main

main()
