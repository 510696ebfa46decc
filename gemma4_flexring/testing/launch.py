"""Where ranks spawned on this machine meet: a file store in a fresh directory.

Handing the ranks a "free" TCP port (bind to port 0, close, pass the number on) leaves a window in
which any other socket, gloo's own connections among them, may take that port first; a file in a
directory nobody else knows cannot be taken::

    with local_init_method() as init_method:
        ...  # start ranks calling dist.init_process_group("gloo", init_method=init_method, ...); join them
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def local_init_method() -> Iterator[str]:
    """A ``file://`` init_method for ``init_process_group``; its directory goes when the block ends,
    so the ranks that use it must have finished by then."""
    with tempfile.TemporaryDirectory(prefix="gemma4_flexring.", ignore_cleanup_errors=True) as directory:
        yield "file://" + os.path.join(directory, "store")
