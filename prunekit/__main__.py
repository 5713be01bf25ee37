"""``python -m prunekit`` runs the command line."""
import sys

from prunekit.app.cli import main

sys.exit(main())
