"""`recipe-dist` whose torch.save fails like a full disk inside checkpoint .partial directories.

Used by tests/test_resume.py where no tmpfs can be mounted (not root): run as a torchrun script.
"""

import errno
import os
import sys

import torch

from recipe_dist.cli import main

_save = torch.save


def _full_disk_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and ".partial" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return _save(obj, f, *args, **kwargs)


torch.save = _full_disk_save

if __name__ == "__main__":
    sys.exit(main())
