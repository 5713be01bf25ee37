"""A fork server for tests that kill real ``prunekit run`` processes (``test_resume.py``).

Started once per backend with ``python run_forkserver.py <backend> [<dataset>,<train>,<test> ...]``, it imports the backend,
the command and matplotlib (seconds a process, paid once; the data sets are read once too and
inherited by the children), then for each line
``{"argv": [...], "log": path}`` on its stdin forks a child that runs ``prunekit <argv>`` with
its output in ``log`` and prints ``pid <pid>`` at once, then ``exit <status>`` when the child
ends (``-9`` for SIGKILL). The children are real processes, killed from outside by the test.
"""
import importlib
import json
import os
import sys


def main() -> None:
    backend = sys.argv[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the run's plots, imported once)

    importlib.import_module(f"prunekit.backends.{backend}")
    from prunekit.app import data
    from prunekit.app.cli import main as prunekit_main

    # each data set is read once, here, and inherited by the children (what is tested is the run)
    load, cache = data.load_dataset, {}

    def load_once(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(*args, **kwargs)
        return cache[key]

    data.load_dataset = load_once
    for spec in sys.argv[2:]:  # "<dataset>,<train limit>,<test limit>": read now, before any fork
        name, train, test = spec.split(",")
        load_once(name, root=None, train_limit=int(train), test_limit=int(test))

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                code = prunekit_main(request["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
