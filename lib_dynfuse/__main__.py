import sys

from lib_dynfuse.cli import main

sys.exit(main())
