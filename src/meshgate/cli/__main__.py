"""`python -m meshgate.cli`, as the tests and the container image run it."""

from meshgate.cli import main

main()
