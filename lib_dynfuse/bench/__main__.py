import os

from lib_dynfuse.bench.main import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
raise SystemExit(main())
