"""`python -m eventrelay ...` is the `eventrelay` command."""

from eventrelay.cli import main

main()
