from .distributed import die_with_launcher

die_with_launcher()  # before anything slow: a rank must not outlive torchrun (distributed.py)

from .cli import run  # noqa: E402

run()
