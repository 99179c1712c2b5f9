"""`python -m tunekit ...` (and `torchrun ... -m tunekit train CONFIG`) runs the command line."""

from tunekit.cli import main

main()
