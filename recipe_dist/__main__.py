import sys

from .distributed import die_with_launcher

die_with_launcher()  # before anything slow: a rank must not outlive torchrun (distributed.py)

from .cli import main  # noqa: E402

sys.exit(main())
