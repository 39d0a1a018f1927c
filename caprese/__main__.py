"""`python -m caprese ...` is the `caprese` command."""

from caprese.cli.main import main

main()
