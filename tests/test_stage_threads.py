"""The background threads of overlapped slide stages (pipeline.batch.context.StageThreads)."""

from __future__ import annotations

import pytest


def test_stage_threads_are_kept_between_batches():
    """The overlapped stages' two threads live as long as the context: one start-up per process."""
    import os
    import threading

    from pipeline.batch.context import StageThreads

    def me():
        return threading.get_ident(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    stages = StageThreads()
    prep, out = stages.pools(low_priority=True)
    assert stages.pools(low_priority=True) == (prep, out)
    first = out.submit(me).result()
    assert out.submit(me).result() == first  # the same thread, reused
    assert first[1] == 19 and prep.submit(me).result()[1] == 19  # lowest priority beside the model's threads
    prep2, out2 = stages.pools(low_priority=False)  # a GPU model: normal priority, new threads
    assert out2 is not out and out2.submit(me).result()[1] == os.getpriority(os.PRIO_PROCESS, 0)
    stages.close()
    with pytest.raises(RuntimeError):  # shut down
        out2.submit(me)
    assert stages.pools(low_priority=False)[1] is not out2
    stages.close()
