"""``python -m stage1_embed_text ...`` = ``flame embed ...``; also a script for ``accelerate launch``."""

import sys

from stage1_embed_text.cli import main

if __name__ == "__main__":
    sys.exit(main())
