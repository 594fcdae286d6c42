import sys

from apigate.cli import main

sys.exit(main())
