"""The set-up every workflow job does first (scripts/job_setup.py): one native thread each."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import run_in_fresh_process

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# A BLAS call and a large OpenCV resize, then the process's OS threads and OpenCV's pool size.
WORK = [
    "import os, numpy, cv2",
    "numpy.ones((300, 300)) @ numpy.ones((300, 300))",
    "cv2.resize(numpy.ones((512, 512), numpy.float32), (2048, 2048))",
]
RESULT = "[len(os.listdir('/proc/self/task')), cv2.getNumThreads()]"


def test_a_job_process_runs_numpy_and_opencv_on_one_thread(monkeypatch):
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        monkeypatch.delenv(variable, raising=False)
    _, (threads, opencv_threads) = run_in_fresh_process(
        [f"sys.path.insert(0, {str(SCRIPTS)!r})", "import job_setup", *WORK], RESULT
    )
    assert (threads, opencv_threads) == (1, 1)
    if (os.cpu_count() or 1) > 1:  # without the set-up both libraries start thread pools
        _, (threads, opencv_threads) = run_in_fresh_process(WORK, RESULT)
        assert threads > 1 and opencv_threads > 1


def test_a_thread_count_the_user_exported_is_kept(monkeypatch):
    monkeypatch.setenv("OPENCV_FOR_THREADS_NUM", "3")
    _, (_, opencv_threads) = run_in_fresh_process(
        [f"sys.path.insert(0, {str(SCRIPTS)!r})", "import job_setup", *WORK], RESULT
    )
    assert opencv_threads == 3
