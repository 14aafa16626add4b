"""``python -m taskloom.client`` is the ``taskloom`` command."""

from taskloom.client.cli import main

main()
