import sys

from shapeflow.cli import main

sys.exit(main())
