"""Ray started from a short-lived thread (a Prefect task's worker thread) survives that thread."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading, time
    from tasks import runtime
    import ray

    t = threading.Thread(target=runtime.ray_init, kwargs={"num_cpus": 1})
    t.start()
    t.join()          # the thread that started the local Ray is gone
    time.sleep(2)     # a head killed with its parent thread would be dead by now

    @ray.remote
    def square(x):
        return x * x

    print("result", ray.get(square.remote(7), timeout=120))
    ray.shutdown()
    print("clean shutdown")
""")


def test_local_ray_started_from_a_thread_outlives_the_thread():
    # a child process: a Ray head dying under the driver makes the driver exit, which must not take pytest with it
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "result 49" in p.stdout and "clean shutdown" in p.stdout, p.stdout + p.stderr[-2000:]
