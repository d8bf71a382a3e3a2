"""Loading an app file never shadows a module of the same name."""

from __future__ import annotations

import queue
import sys
from pathlib import Path

from ops.services import load_app


def test_an_app_named_like_a_stdlib_module_does_not_replace_it(tmp_path: Path) -> None:
    app = tmp_path / "queue.py"
    app.write_text("MARK = 'app'\n\ndef build(ssc):\n    pass\n")
    mod = load_app(str(app))
    assert mod.MARK == "app"
    assert sys.modules["queue"] is queue, "the standard library's queue is still queue"
    assert hasattr(sys.modules["queue"], "Queue")
    assert sys.modules[mod.__name__] is mod and mod.__name__ == "dstream_app_queue"
