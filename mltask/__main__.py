import sys

from mltask.cli import main

sys.exit(main())
